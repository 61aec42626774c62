"""One vLLM engine in a fresh process (vLLM keeps process-wide state: one engine per process), for
tests/test_vllm_plugin.py. Reads a JSON request on stdin, prints one JSON line: each prompt's greedy tokens and the
speculative-decoding counters vLLM reports.

request: {"model": dir, "draft": dir or null, "num_speculative_tokens": n, "prompts": [[ids], ...],
          "max_new_tokens": n, "tokenizer": bool}
"""
import json
import sys

from sdalign_rt.vllm_plugin import engine

engine.configure()


def main() -> None:
    request = json.loads(sys.stdin.read())
    protocol = engine.private_stdout()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    speculative = None
    if request.get("draft"):
        speculative = {"method": "eagle", "model": request["draft"],
                       "num_speculative_tokens": request.get("num_speculative_tokens", 1)}
    llm = LLM(model=request["model"], dtype="float32", max_model_len=512, seed=0, enforce_eager=True,
              disable_log_stats=False, skip_tokenizer_init=not request.get("tokenizer", False),
              speculative_config=speculative)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], detokenize=False,
                            ignore_eos=request.get("ignore_eos", False))
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                           use_tqdm=False)
    protocol.write(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                               "spec": engine.spec_counters(llm)}) + "\n")
    protocol.flush()


if __name__ == "__main__":
    main()
