"""The sdalign-rt command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys


def _info(args) -> int:
    import torch

    from sdalign_rt import __version__, _ext, ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "sdalign_rt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpp_extension": "built" if _ext.cpp_available() else f"absent ({_ext.load_error})",
        "backend_setting": ops.get_backend(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "backends": {d: ops.available_backends(d) for d in devices},
    }
    print(json.dumps(report, indent=2))
    return 0


def _require_dirs(command: str, args, names=("target", "draft", "adapter")) -> None:
    """A clear exit for a checkpoint or adapter argument that is not a directory."""
    for name in names:
        path = getattr(args, name, None)
        if path is not None and not os.path.isdir(path):
            raise SystemExit(f"sdalign-rt {command}: --{name.replace('_', '-')} {path!r} is not a directory")


def _generate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sdalign_rt as sd

    _check_generate_args(args)
    _require_dirs("generate", args)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
    # Without --draft the target drafts from its own first K layers: one copy of the weights, one shared cache.
    draft = (target if args.draft is None or os.path.realpath(args.draft) == os.path.realpath(args.target)
             else AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(args.device).eval())
    tree = sd.TreeSpec.parse(args.tree)
    if tree.kind == "root" and args.draft is None and args.draft_layers is None:  # the check above allowed lookup:M
        draft = None  # "lookup:M" (or "root"): no drafter model, the copied chain alone
    elif draft is target and args.draft_layers is None:
        raise SystemExit("sdalign-rt generate: the drafter is the target itself, so pass --draft-layers K (draft "
                         "from its first K layers); a full copy of the target would draft at the target's cost")
    adapter = (sd.BottleneckAdapter.from_pretrained(args.adapter, dtype=dtype, device=args.device)
               if args.adapter else None)
    decoder = sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, mode=args.mode,
                                    tree=tree, feature_threshold=args.threshold,
                                    draft_layers=args.draft_layers, pad_token_id=tokenizer.pad_token_id,
                                    compile=args.compile, graphs=False if args.no_graphs else None)
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True).to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = decoder.generate(batch.input_ids, args.max_new_tokens, attention_mask=batch.attention_mask,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    texts = tokenizer.batch_decode(out.sequences[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    for prompt, text in zip(args.prompt, texts):
        print(f"### {prompt}\n{text}")
    report = {"mode": args.mode, "tree": args.tree, "texts": texts, "stats": out.stats}
    print(json.dumps(report["stats"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _check_generate_args(args) -> None:
    """Clear exits for flag combinations that cannot work, before any model loads."""
    def fail(message):
        raise SystemExit(f"sdalign-rt generate: {message}")

    if args.draft is None and args.draft_layers is None and not args.tree.startswith(("lookup:", "root")):
        fail("pass --draft DRAFTER, or --draft-layers K to draft from the target's own first K layers (or --tree "
             "lookup:M: prompt lookup alone, no drafter model)")
    if args.draft_layers is not None and args.draft_layers < 1:
        fail(f"--draft-layers must be >= 1, got {args.draft_layers}")
    if args.mode != "sample" and (args.temperature != 1.0 or args.top_k is not None or args.top_p is not None):
        fail(f"--temperature / --top-k / --top-p shape sample mode's distribution; --mode is {args.mode}")
    if args.mode != "feature" and args.threshold != 0.9:
        fail(f"--threshold is feature mode's cosine threshold; --mode is {args.mode}")
    if args.device == "cpu" and args.dtype == "float16":
        fail("--dtype float16 on the CPU is slow and overflows; use float32 or bfloat16")


def _pair_check(args) -> int:
    import tempfile

    import torch

    import sdalign_rt as sd
    from sdalign_rt.models.eventgpt_checkpoint import checkpoint_weight_names, weight_layout
    from sdalign_rt.models.eventgpt_prompt import EVENT_TOKENS
    from sdalign_rt.models.pair import PairSample, load_pair, save_tiny_pair, synthetic_sample

    workdir = args.dir or tempfile.mkdtemp(prefix="sdalign-pair-")
    if args.tiny:
        drafter_path, verifier_path = save_tiny_pair(workdir, seed=args.seed, layout=args.tiny_layout,
                                                     start_end=args.tiny_start_end)
        sample = synthetic_sample(workdir, seed=args.seed)
        dtype = torch.float32
    else:
        missing = [n for n in ("drafter", "verifier", "events", "video") if getattr(args, n) is None]
        if missing:
            raise SystemExit(f"sdalign-rt pair-check: without --tiny, give --{' --'.join(missing)}")
        drafter_path, verifier_path = args.drafter, args.verifier
        sample = PairSample(events=args.events, frames=args.video, question=args.question)
        dtype = getattr(torch, args.dtype)
    pair = load_pair(drafter_path, verifier_path, load_in_4bit=args.load_in_4bit, dtype=dtype,
                     device_map=args.device_map, clip_dir=args.clip_dir)
    inputs = pair.prepare(sample)
    adapter = (sd.BottleneckAdapter.from_pretrained(args.adapter, dtype=dtype, device=pair.drafter.device)
               if args.adapter else None)
    decoder = pair.decoder(adapter=adapter, tree=sd.TreeSpec.parse(args.tree), draft_layers=args.draft_layers)
    out = decoder.generate(inputs.input_ids, args.max_new_tokens, **inputs.generate_kwargs())
    expected = pair.verifier.generate(inputs.input_ids, attention_mask=inputs.attention_mask,
                                      max_new_tokens=args.max_new_tokens, do_sample=False,
                                      pad_token_id=decoder.pad_token_id, **inputs.target_inputs)
    width = min(out.sequences.shape[1], expected.shape[1])
    report = {
        "lossless": bool(out.sequences.shape == expected.shape and torch.equal(out.sequences, expected)),
        "new_tokens": int(out.sequences.shape[1] - inputs.input_ids.shape[1]),
        "first_difference": next((int(i) for i in range(width) if out.sequences[0, i] != expected[0, i]), None),
        "tree": args.tree, "draft_layers": args.draft_layers, "tiny": args.tiny,
        "drafter_layout": weight_layout(checkpoint_weight_names(drafter_path)),
        "drafter_event_tokens": [t for t in EVENT_TOKENS if t in pair.drafter_tokenizer.added_tokens_encoder],
        "mean_accepted": out.stats["mean_accepted"], "acceptance_rate": out.stats["acceptance_rate"],
        "steps": out.stats["steps"], "timings": out.stats["timings"],
        "drafter": drafter_path, "verifier": verifier_path,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["lossless"] else 1


def _read_prompts(path: str) -> list[str]:
    """A prompt file: a JSON list of strings or of {"prompt": ...} objects, or one prompt per line."""
    if not os.path.isfile(path):
        raise SystemExit(f"sdalign-rt: prompt file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        items = json.loads(text)
        return [item["prompt"] if isinstance(item, dict) else str(item) for item in items]
    return [line for line in text.splitlines() if line.strip()]


def _extract(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdalign_rt.extract import ExtractSample, extract_pairs

    _require_dirs("extract", args, ("target", "draft"))
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
    # Without --draft the target drafts from its own first K layers: one copy of the weights, one shared cache.
    draft = (target if args.draft is None or os.path.realpath(args.draft) == os.path.realpath(args.target)
             else AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(args.device).eval())
    if draft is target and args.draft_layers is None:
        raise SystemExit("sdalign-rt generate: the drafter is the target itself, so pass --draft-layers K (draft "
                         "from its first K layers); a full copy of the target would draft at the target's cost")
    samples = [ExtractSample(id=str(i), input_ids=tokenizer(prompt, return_tensors="pt").input_ids.to(args.device))
               for i, prompt in enumerate(_read_prompts(args.prompts))]
    manifest = extract_pairs(draft, target, samples, args.out, max_new_tokens=args.max_new_tokens,
                             draft_layers=args.draft_layers, shard_rows=args.shard_rows)
    rows = sum(shard["rows"] for shard in manifest["shards"])
    print(json.dumps({"out": args.out, "samples": len(manifest["done"]), "rows": rows,
                      "shards": len(manifest["shards"]), "meta": manifest["meta"]}, indent=2))
    return 0


def _plan_tree(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sdalign_rt as sd
    from sdalign_rt.tree_planner import plan_tree

    _require_dirs("plan-tree", args)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
    draft = target if args.draft in (None, args.target) else \
        AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(args.device).eval()
    adapter = (sd.BottleneckAdapter.from_pretrained(args.adapter, dtype=dtype, device=args.device)
               if args.adapter else None)
    prompts = []
    for prompt in _read_prompts(args.prompts):
        if args.chat_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not args.chat_template).input_ids
        prompts.append(ids.to(args.device))
    planned, report = plan_tree(target, draft, prompts, adapter=adapter, draft_layers=args.draft_layers,
                                max_nodes=args.max_nodes, max_depth=args.max_depth, ranks=args.ranks,
                                new_tokens=args.new_tokens, lookup_top=args.lookup_top)
    print(json.dumps({"tree": report["plan"]["tree"], "expected_tokens": planned.expected_tokens,
                      "predicted_tokens_per_s": planned.predicted_tokens_per_s,
                      "measured_tokens_per_s": report["measured_tokens_per_s"]}, indent=2))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    suffix = f"+lookup-top:{planned.tree.lookup_top}" if planned.tree.lookup_top else ""
    print(f"wrote {args.json} (use it as --tree static:{args.json}{suffix})")
    return 0


def _train_adapter(args) -> int:
    from sdalign_rt.extract import load_pairs
    from sdalign_rt.train_adapter import TrainConfig, train_adapter

    rows = load_pairs(args.pairs)
    lm_head = norm_init = None
    if args.ce_weight or args.draft_vocab:
        if not args.target:
            raise SystemExit("sdalign-rt train-adapter: --ce-weight and --draft-vocab need --target (the verifier, "
                             "for its LM head)")
        from transformers import AutoModelForCausalLM

        lm_head = AutoModelForCausalLM.from_pretrained(args.target).get_output_embeddings()
    if args.draft and args.input_norm:
        from transformers import AutoModelForCausalLM

        from sdalign_rt.shallow import final_norm

        norm_init = final_norm(AutoModelForCausalLM.from_pretrained(args.draft)).weight.detach()
    config = TrainConfig(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainConfig)})
    _, log = train_adapter(rows, config, out_dir=args.out, lm_head=lm_head, norm_init=norm_init)
    print(json.dumps({k: log[k] for k in ("rows", "initial_val_loss", "best_val_loss", "best_epoch", "epochs_run")},
                     indent=2))
    return 0


def _eval_alignment(args) -> int:
    from transformers import AutoModelForCausalLM

    import sdalign_rt as sd
    from sdalign_rt.eval_alignment import evaluate_alignment, write_report
    from sdalign_rt.extract import load_pairs
    from sdalign_rt.train_adapter import LOG, held_out_rows

    rows = load_pairs(args.pairs)
    if args.split == "val":  # the rows train-adapter held out, from its log's seed and fraction
        log_path = os.path.join(args.adapter, LOG)
        if not os.path.isfile(log_path):
            raise SystemExit(f"sdalign-rt eval-alignment: --split val needs {log_path} (or use --split all)")
        with open(log_path) as f:
            config = json.load(f)["config"]
        rows = held_out_rows(rows, config["val_fraction"], config["seed"], config.get("split", "rows"))
    measured = None
    if args.measured:
        with open(args.measured) as f:
            measured = json.load(f)
        measured = measured.get("stats", measured)
    adapter = sd.BottleneckAdapter.from_pretrained(args.adapter)
    lm_head = AutoModelForCausalLM.from_pretrained(args.target).get_output_embeddings()
    report = evaluate_alignment(adapter, rows, lm_head, gamma=args.gamma, cost_ratio=args.cost_ratio,
                                measured=measured)
    write_report(report, args.out)
    print(json.dumps({k: report[k] for k in ("rows", "top1_agreement", "top5_agreement", "acceptance", "projection")},
                     indent=2))
    return 0


def _demo_config(args):
    from sdalign_rt.demo.experiment import DemoConfig

    return DemoConfig(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(DemoConfig)
                         if getattr(args, spec.name, None) is not None})


def _demo(args) -> int:
    from sdalign_rt.demo.experiment import run_demo, write_demo

    config = _demo_config(args)
    if args.full:  # the published figures: more prompts, longer answers, more rounds, feature mode's sweep
        from sdalign_rt.demo.experiment import FULL

        config = dataclasses.replace(config, **{key: value for key, value in FULL.items()
                                                if getattr(args, key, None) is None})
    result = run_demo(config, cache_dir=args.cache_dir, sweep_features=args.full or args.feature_sweep,
                      retrain=args.retrain)
    for row in result["prompts"][:2]:
        print(f"### {row['prompt']}\n{row['text']}\n")
    keys = ("lossless", "speedup", "tokens_per_s_baseline", "tokens_per_s_spec", "acceptance_rate", "token_acceptance",
            "mean_accepted", "per_position_acceptance", "adapter_cosine", "draft_layers", "tree", "draft_cost_ratio",
            "bookkeeping_share_of_verify")
    print(json.dumps({key: result[key] for key in keys}, indent=2))
    print(_demo_table(result))
    if "acceptance" in result:
        acc = result["acceptance"]
        print(f"on {acc['conversations']} frozen evaluation conversations: first draft {acc['first_draft']:.3f}, "
              f"second {acc['second_draft']:.3f} (chain:4); tau {acc['tree']['mean_accepted']:.2f} with "
              f"{acc['tree']['per_position_acceptance']} by depth (tree {result['tree']}); lossless {acc['lossless']}")
    write_demo(result, args.json)
    print(f"wrote {args.json} and {os.path.splitext(args.json)[0]}.png")
    return 0 if result["lossless"] and result.get("acceptance", {}).get("lossless", True) else 1


def _make_train_set(args) -> int:
    from sdalign_rt.demo import smollm2
    from sdalign_rt.demo.experiment import load_model
    from sdalign_rt.demo.training_set import SHIPPED_SET, build_training_set

    cache_dir = args.cache_dir or smollm2.default_cache_dir()
    model, tokenizer = load_model(smollm2.checkpoint(cache_dir), "float32")
    result = build_training_set(model, tokenizer, os.path.join(cache_dir, "training-set-work"),
                                requests=args.requests, seed=args.seed)
    out = args.out or SHIPPED_SET
    with open(out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(f"wrote {len(result['conversations'])} conversations to {out}: {result['kinds']}")
    return 0


def _export_vllm_drafter(args) -> int:
    from sdalign_rt.vllm_plugin.export import export_drafter

    if args.target is not None and args.adapter is None:
        raise SystemExit("sdalign-rt export-vllm-drafter: --target needs --adapter (the shipped adapter is the "
                         "embedded SmolLM2's)")
    if args.target is None or args.adapter is None:
        # The embedded default: SmolLM2 and the adapter shipped for it (trained for its first 2 layers).
        from sdalign_rt.demo import experiment, smollm2

        if args.target is None:
            args.target = smollm2.checkpoint(args.cache_dir)
        if args.adapter is None:
            args.adapter = experiment.SHIPPED
            provenance = experiment.shipped_provenance() or {}
            shipped_k = provenance.get("config", {}).get("draft_layers")
            if args.draft_layers is None:
                args.draft_layers = shipped_k
            elif shipped_k is not None and args.draft_layers != shipped_k:
                raise SystemExit(f"sdalign-rt export-vllm-drafter: the shipped adapter was trained on layer {shipped_k}'s "
                                 f"states, not {args.draft_layers}'s: pass --adapter for another depth")
    if args.draft_layers is None:
        raise SystemExit("sdalign-rt export-vllm-drafter: --draft-layers is required with --adapter (the depth it was trained on)")
    _require_dirs("export-vllm-drafter", args, ("target", "adapter"))
    try:
        out = export_drafter(args.target, args.adapter, args.draft_layers, args.out, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"sdalign-rt export-vllm-drafter: {error}") from error
    print(f"wrote the vLLM draft checkpoint to {out}. Use it (with sdalign_rt installed beside vLLM) as:\n"
          f"  vllm serve {args.target} --speculative-config "
          f"'{{\"method\": \"eagle\", \"model\": \"{out}\", \"num_speculative_tokens\": 1}}'\n"
          f"  LLM(model={args.target!r}, speculative_config={{\"method\": \"eagle\", \"model\": {out!r}, "
          f"\"num_speculative_tokens\": 1}})")
    return 0


# The peers as a reader should read them (SmolLM2 was not trained to exit early: that peer shows HF's assisted
# decoding with the same shallow drafter and no adapter, not a tuned early-exit model).
DEMO_LABELS = {"hf_generate": "HF generate (greedy)", "hf_prompt_lookup": "HF prompt lookup",
               "hf_early_exit": "HF assisted, early exit (untrained for it)", "ours_one_token": "ours, one token/step",
               "ours_prompt_lookup": "ours, prompt lookup alone (lookup:3)",
               "ours_adapter_only": "ours, speculative, adapter drafts only", "ours_speculative": "ours, speculative"}


def _demo_table(result: dict) -> str:
    """Speculation over our own one-token decode first (what drafting adds), over HF generate beside it; both are
    medians of per-round ratios, so a noisy round moves neither much."""
    peers = result["peers"]
    lines = [f"{'system':<42} {'tokens/s':>8} {'vs ours 1-token':>15} {'vs HF generate':>14} {'identical':>9}"]
    for name, peer in peers.items():
        lines.append(f"{DEMO_LABELS.get(name, name):<42} {peer['tokens_per_s']:>8.1f} "
                     f"{peer['over_one_token']:>14.2f}x {peer['speedup']:>13.2f}x {str(peer['identical']):>9}")
    lines.append(f"speculation adds {result['speculation_over_one_token']:.2f}x over our own one-token decode; the "
                 f"runtime runs {peers['ours_speculative']['speedup']:.2f}x HF generate "
                 f"(lossless: {result['lossless']})")
    return "\n".join(lines)


def _compare_adapters(args) -> int:
    from sdalign_rt.demo.experiment import compare_adapters, write_comparison

    result = compare_adapters(_demo_config(args), cache_dir=args.cache_dir, tree=args.compare_tree)
    print(f"{'variant':<46} {'top-1':>6} {'1st':>6} {'2nd':>6} {'tau':>5} {'draft ms':>8} {'vs 1-token':>10}")
    for row in result["rows"]:
        first, second = (row["per_position_acceptance"] + [0.0, 0.0])[:2]
        print(f"{row['variant']:<46} {row['top1_agreement']:>6.3f} {first:>6.3f} {second:>6.3f} "
              f"{row['mean_accepted']:>5.2f} {row['draft_ms_per_step']:>8.2f} {row['over_one_token']:>9.2f}x")
    print(f"winner: {result['winner']}")
    write_comparison(result, args.json)
    return 0


def _add_demo_flags(command, defaults) -> None:
    command.add_argument("--tree", default=None, help=f"draft tree, or 'plan' to plan it from this machine's "
                         f"measured costs (default {defaults.tree})")
    command.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                         help=f"model dtype (default {defaults.dtype})")
    command.add_argument("--max-new-tokens", type=int, default=None,
                         help=f"per evaluation prompt (default {defaults.max_new_tokens})")
    command.add_argument("--eval-prompts", type=int, default=None,
                         help=f"frozen evaluation conversations every peer runs (default {defaults.eval_prompts})")
    command.add_argument("--train-prompts", type=int, default=None,
                         help=f"training conversations to distil (default {defaults.train_prompts}, 0: all)")
    command.add_argument("--context", action=argparse.BooleanOptionalAction, default=None,
                         help=f"adapter reads the verifier's previous state (default {defaults.context})")
    command.add_argument("--self-context", type=float, default=None,
                         help=f"share of training rows that read the adapter's own prediction as context "
                         f"(default {defaults.self_context})")
    command.add_argument("--unroll", type=int, default=None,
                         help=f"train through the adapter's own predictions for N positions "
                         f"(default {defaults.unroll})")
    command.add_argument("--bottleneck", type=int, default=None, help=f"adapter rank R (default {defaults.bottleneck})")
    command.add_argument("--kl-weight", type=float, default=None, help=f"weight of the soft-target loss (KL to the "
                         f"verifier's distribution; default {defaults.kl_weight})")
    command.add_argument("--train-set", default=None, choices=["generated", "templates"],
                         help=f"training conversations: the model-written set, or the earlier topic templates "
                         f"(default {defaults.train_set})")
    command.add_argument("--sampled", type=float, default=None,
                         help=f"share of training conversations also distilled on sampled text (default "
                         f"{defaults.sampled})")
    command.add_argument("--acceptance-prompts", type=int, default=None,
                         help=f"frozen evaluation conversations the acceptance report decodes (default "
                         f"{defaults.acceptance_prompts}; 0: none)")
    command.add_argument("--rounds", type=int, default=None,
                         help=f"interleaved repetitions (default {defaults.rounds})")
    command.add_argument("--epochs", type=int, default=None, help=f"adapter training epochs (default {defaults.epochs})")
    command.add_argument("--lookup-top", type=int, default=None,
                         help=f"the tree's top path takes this many tokens from the context lookup where the text's "
                         f"last tokens occurred before (default {defaults.lookup_top}; 0: the adapter's drafts only)")
    command.add_argument("--cache-dir", default=None, help="where the checkpoint, distilled rows and adapters are "
                         "kept (default $SDALIGN_RT_CACHE or ~/.cache/sdalign_rt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdalign-rt", description="Speculative decoding between different "
                                     "multimodal models: runtime and tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, the C++ extension and the backends each device can use")
    info.set_defaults(run=_info)

    gen = commands.add_parser("generate", help="speculative decoding with local checkpoints (shared vocabulary)")
    gen.add_argument("--target", required=True, help="verifier checkpoint directory (transformers layout)")
    gen.add_argument("--draft", default=None, help="drafter checkpoint directory (default: the target itself, "
                     "with --draft-layers K: self-speculative, one copy of the weights, one shared cache)")
    gen.add_argument("--adapter", default=None, help="BottleneckAdapter directory (aligned drafting)")
    gen.add_argument("--tree", default="chain:4", help="chain:DEPTH | static:CHOICES_JSON_OR_FILE | "
                     "dynamic:TOP_K,DEPTH,TOTAL (default chain:4)")
    gen.add_argument("--mode", default="greedy", choices=["greedy", "sample", "feature"])
    gen.add_argument("--threshold", type=float, default=0.9, help="feature mode's cosine threshold")
    gen.add_argument("--draft-layers", type=int, default=None,
                     help="draft from the drafter's first K decoder layers only (shallow drafting)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--compile", action="store_true", help="torch.compile the forwards (optional; measured)")
    gen.add_argument("--no-graphs", action="store_true", help="CUDA: run each step eagerly instead of replaying "
                     "it as a captured CUDA graph")
    gen.add_argument("--json", default=None, help="also write texts and stats here")
    gen.set_defaults(run=_generate)

    pair = commands.add_parser("pair-check", help="EventGPT drafts for Video-LLaVA on one sample; checks the output "
                               "equals the verifier's own greedy output (JSON with 'lossless')")
    pair.add_argument("--tiny", action="store_true", help="tiny random checkpoints and a synthetic sample")
    pair.add_argument("--dir", default=None, help="where --tiny writes its checkpoints and sample")
    pair.add_argument("--tiny-layout", default="nested", choices=["nested", "flat", "none"],
                      help="--tiny's EventGPT weight layout: nested (public names model.visual_tower.visual_tower.*), "
                      "flat (model.visual_tower.*), none (no tower weights; mm_visual_tower names a CLIP folder)")
    pair.add_argument("--tiny-start-end", action="store_true",
                      help="--tiny's EventGPT config sets mm_use_im_start_end (<ev_start>/<ev_end> are added tokens)")
    pair.add_argument("--drafter", help="EventGPT checkpoint directory")
    pair.add_argument("--clip-dir", default=None, help="where the drafter's CLIP tower (config mm_visual_tower) is: "
                      "the tower folder, or a folder holding it by name (default: beside the checkpoint)")
    pair.add_argument("--verifier", help="Video-LLaVA checkpoint directory (transformers layout)")
    pair.add_argument("--events", help="event .npy file (pickled dict x, y, p, t)")
    pair.add_argument("--video", help="the matching RGB clip (mp4)")
    pair.add_argument("--question", default="What are the key elements in this scene?")
    pair.add_argument("--adapter", default=None, help="BottleneckAdapter directory (aligned drafting)")
    pair.add_argument("--tree", default="chain:4")
    pair.add_argument("--draft-layers", type=int, default=None)
    pair.add_argument("--max-new-tokens", type=int, default=32)
    pair.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4")
    pair.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    pair.add_argument("--device-map", default=None, help='accelerate device map, e.g. "auto"')
    pair.add_argument("--seed", type=int, default=0)
    pair.add_argument("--json", default=None)
    pair.set_defaults(run=_pair_check)

    ext = commands.add_parser("extract", help="prefix-conditioned (drafter state, verifier state, next token) rows "
                              "for adapter training, as resumable safetensors shards")
    ext.add_argument("--target", required=True, help="verifier checkpoint directory")
    ext.add_argument("--draft", required=True, help="drafter checkpoint directory (same tokenizer)")
    ext.add_argument("--prompts", required=True, help="JSON list of prompts, or one prompt per line")
    ext.add_argument("--out", required=True, help="output directory (rerun to resume)")
    ext.add_argument("--max-new-tokens", type=int, default=64)
    ext.add_argument("--draft-layers", type=int, default=None, help="store the drafter's layer-K states")
    ext.add_argument("--shard-rows", type=int, default=4096)
    ext.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ext.add_argument("--device", default="cpu")
    ext.set_defaults(run=_extract)

    train = commands.add_parser("train-adapter", help="train a BottleneckAdapter on extracted rows (resumable)")
    train.add_argument("--pairs", required=True, help="directory written by sdalign-rt extract")
    train.add_argument("--out", required=True, help="adapter directory (safetensors + JSON; rerun to resume)")
    train.add_argument("--target", default=None, help="verifier checkpoint: its LM head, for --ce-weight and "
                       "--draft-vocab")
    train.add_argument("--draft", default=None, help="drafter checkpoint: its final norm starts --input-norm")
    from sdalign_rt.train_adapter import TrainConfig

    for spec in dataclasses.fields(TrainConfig):  # one flag per training setting, defaults from TrainConfig
        flag = f"--{spec.name.replace('_', '-')}"
        if isinstance(spec.default, bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=spec.default)
        else:
            train.add_argument(flag, type=type(spec.default), default=spec.default)
    train.set_defaults(run=_train_adapter)

    plan = commands.add_parser("plan-tree", help="the static tree with the most tokens/s for this pair on this device: "
                               "acceptance by (depth, rank) calibrated on prompts, step costs timed (JSON)")
    plan.add_argument("--target", required=True, help="verifier checkpoint directory")
    plan.add_argument("--draft", default=None, help="drafter checkpoint directory (default: the verifier itself)")
    plan.add_argument("--adapter", default=None, help="BottleneckAdapter directory (aligned drafting)")
    plan.add_argument("--draft-layers", type=int, default=None)
    plan.add_argument("--prompts", required=True, help="calibration prompts (JSON list or one per line); not the "
                      "prompts you evaluate on")
    plan.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    plan.add_argument("--max-nodes", type=int, default=16, help="largest tree, root included")
    plan.add_argument("--max-depth", type=int, default=6)
    plan.add_argument("--ranks", type=int, default=4, help="candidates per depth the calibration tree tries")
    plan.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per calibration prompt")
    plan.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    plan.add_argument("--device", default="cpu")
    plan.add_argument("--json", default="tree_plan.json")
    plan.add_argument("--lookup-top", type=int, default=0, help="every tree copies its top path's first N nodes "
                      "from the context where the text's last tokens occurred before (TreeSpec +lookup-top:N)")
    plan.set_defaults(run=_plan_tree)

    evaluate = commands.add_parser("eval-alignment", help="cosine, top-k agreement, acceptance by threshold and "
                                   "the projected speedup of an adapter on held-out rows (JSON + PNG)")
    evaluate.add_argument("--pairs", required=True, help="directory written by sdalign-rt extract")
    evaluate.add_argument("--adapter", required=True, help="adapter directory written by train-adapter")
    evaluate.add_argument("--target", required=True, help="verifier checkpoint (its LM head)")
    evaluate.add_argument("--split", default="val", choices=["val", "all"],
                          help="val: the rows train-adapter held out (default); all: every row (a held-out set)")
    evaluate.add_argument("--gamma", type=int, default=4, help="drafts per step for windows and projections")
    evaluate.add_argument("--cost-ratio", type=float, default=0.0, help="draft cost / verifier cost per token")
    evaluate.add_argument("--measured", default=None, help="JSON with stats measured by the decoding loop")
    evaluate.add_argument("--out", default="alignment_report.json")
    evaluate.set_defaults(run=_eval_alignment)

    from sdalign_rt.demo.experiment import DemoConfig

    defaults = DemoConfig()
    demo = commands.add_parser("demo", help="the embedded default: SmolLM2-135M drafting from its first k layers "
                               "through a trained adapter, against every peer (trains the adapter once)")
    demo.add_argument("--draft-layers", type=int, default=None,
                      help=f"draft from the first K layers (default {defaults.draft_layers}, from compare-adapters)")
    _add_demo_flags(demo, defaults)
    demo.add_argument("--full", action="store_true", help="the published figures: 11 frozen evaluation conversations "
                      "(one per kind) x 96 tokens x 3 rounds, acceptance on all 48, and feature mode's threshold "
                      "sweep (default: 4 x 48 tokens x 2 rounds, acceptance on 11, no sweep)")
    demo.add_argument("--feature-sweep", action="store_true", help="also run feature mode's threshold sweep")
    demo.add_argument("--retrain", action="store_true", help="rebuild everything through the pipeline: distil the "
                      "verifier's answers, train the adapter, plan the tree (instead of the shipped adapter and plan)")
    demo.add_argument("--json", default="demo_result.json", help="result JSON (a PNG is written beside it)")
    demo.set_defaults(run=_demo)

    make = commands.add_parser("make-train-set", help="the embedded default's training conversations, written by "
                               "SmolLM2 itself from a few seeds per kind (resumable; minutes)")
    make.add_argument("--requests", type=int, default=1400, help="model-written requests to keep")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", default=None, help="default: the package's train_set.json")
    make.add_argument("--cache-dir", default=None, help="where the checkpoint and the per-batch work are kept")
    make.set_defaults(run=_make_train_set)

    compare = commands.add_parser("compare-adapters", help="the embedded default's drafting variants (context, data, "
                                  "draft depth k): held-out top-1, in-loop acceptance, tau, speedup; names the winner")
    _add_demo_flags(compare, defaults)
    compare.add_argument("--compare-tree", default="chain:4", help="the one tree every variant decodes with")
    compare.add_argument("--json", default="adapters.json")
    compare.set_defaults(run=_compare_adapters)

    export = commands.add_parser("export-vllm-drafter", help="a checkpoint folder of our drafter (the verifier's first "
                                 "k layers + the adapter) that vLLM loads as speculative_config method \"eagle\"")
    export.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors)")
    export.add_argument("--target", default=None, help="the verifier's checkpoint folder (a Llama-family causal LM; "
                        "default: the embedded SmolLM2)")
    export.add_argument("--adapter", default=None, help="the adapter folder (default: the one shipped for SmolLM2)")
    export.add_argument("--draft-layers", type=int, default=None, help="k, the depth the adapter was trained on "
                        "(default: the shipped adapter's)")
    export.add_argument("--dtype", default=None, help="cast the weights (float32, bfloat16, float16; default: as stored)")
    export.add_argument("--cache-dir", default=None, help="where the embedded checkpoint is kept")
    export.set_defaults(run=_export_vllm_drafter)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
