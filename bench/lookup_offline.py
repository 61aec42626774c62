"""Offline: how often each first-draft rule is right, on the frozen evaluation set's greedy answers.

    python bench/lookup_offline.py [--json bench/results/lookup_offline_cpu.json]

SmolLM2-135M-Instruct answers the 48 frozen evaluation conversations greedily (96 new tokens; distilled once
into the cache with its layer-2 states, ~1 minute). Every answer position is taken as a step's root: is the next
token the shipped adapter's draft (teacher-forced context, as at a tree's root), the context lookup's copy (what
followed the latest earlier occurrence of the text's last 1-3 tokens; `reference.lookup_proposals`), or the
choice of a rule between them? The rules: copy where the recurring suffix is at least 1 / 2 / 3 tokens long,
else the adapter; copy where the adapter's top probability is under a threshold; either right (the oracle).
This chose `LOOKUP_TOP_MIN_MATCH` (sdalign_rt/drafter.py). Rows are positions, not in-loop steps: the loop's
steps start where the previous one ended, so in-loop rates differ (bench_lookup.py measures those).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(RESULTS, "lookup_offline_cpu.json"))
    args = parser.parse_args(argv)

    from sdalign_rt.adapter import BottleneckAdapter
    from sdalign_rt.demo import experiment
    from sdalign_rt.demo.smollm2 import checkpoint, default_cache_dir
    from sdalign_rt.extract import ExtractSample, extract_self_pairs, load_pairs
    from sdalign_rt.reference import lookup_proposals

    model, tokenizer = experiment.load_model(checkpoint(), "float32")
    adapter = BottleneckAdapter.from_pretrained(experiment.SHIPPED).float().eval()
    k = experiment.shipped_provenance()["config"]["draft_layers"]
    conversations = experiment.eval_conversations(48)
    prompts = [experiment.chat_ids(tokenizer, c["messages"]) for c in conversations]
    rows_dir = os.path.join(default_cache_dir(), f"distil-frozen-eval-k{k}-n96")
    extract_self_pairs(model, [ExtractSample(id=str(i), input_ids=p) for i, p in enumerate(prompts)], rows_dir,
                       draft_layers=k, max_new_tokens=96, batch_size=16, dtype=torch.float16)
    rows = load_pairs(rows_dir, draft_layers=k)
    head = model.get_output_embeddings().weight.detach().float()[adapter.draft_vocab]
    with torch.no_grad():
        probs = (adapter(rows["draft_hidden"].float(), rows["context_hidden"].float()) @ head.T).softmax(-1)
    confidence, best = probs.max(-1)
    adapter_right = (adapter.draft_vocab[best] == rows["next_token"]).tolist()
    confidence = confidence.tolist()
    sample_of = [int(i) for i in rows["sample_ids"]]
    counts = {"positions": 0, "adapter": 0, "oracle": 0, "copy_proposes": 0, "copy_right": 0}
    rules = {f"copy if suffix >= {n}": 0 for n in (1, 2, 3)}
    rules.update({f"copy if adapter prob < {t}": 0 for t in (0.3, 0.5, 0.7)})
    for number, ids in enumerate(prompts):
        mine = torch.nonzero(rows["sample"] == sample_of.index(number)).flatten().tolist()
        answer = rows["next_token"][mine].tolist()
        text = ids[0].tolist()
        for j, row in enumerate(mine):
            proposal, matched = lookup_proposals(text + answer[:j], 1)
            copy = matched > 0 and proposal[0] == answer[j]
            mine_right = bool(adapter_right[row])
            counts["positions"] += 1
            counts["adapter"] += mine_right
            counts["oracle"] += mine_right or copy
            counts["copy_proposes"] += matched > 0
            counts["copy_right"] += copy
            for n in (1, 2, 3):
                rules[f"copy if suffix >= {n}"] += copy if matched >= n else mine_right
            for t in (0.3, 0.5, 0.7):
                rules[f"copy if adapter prob < {t}"] += copy if (matched and confidence[row] < t) else mine_right
    total = counts.pop("positions")
    result = {"what": __doc__.splitlines()[0], "command": "python bench/lookup_offline.py", "positions": total,
              "right": {key: value / total for key, value in counts.items()},
              "rules": {key: value / total for key, value in rules.items()},
              "environment": experiment.environment()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("positions", "right", "rules")}, indent=2))
    return result


if __name__ == "__main__":
    main()
