"""The IOI circuit of a model, found as in the IOI paper: its faithfulness and the time taken.

Runs ``ck.find_ioi_circuit`` (four rounds of path patching back from the logits, classes named
by attention patterns) on IOI prompts, prints the circuit and the path-patching table of every
round beside the heads' attention scores, direct logit attribution and activation patching,
then evaluates the circuit: faithfulness F(C)/F(M) with a bootstrap interval, faithfulness as
the classes are added one round at a time, completeness (the empty set, each class, random
subsets, a greedy search) and minimality of every head, and compares with the IOI paper's
figures for GPT-2 small (26 heads; logit difference 3.56 for the model and about 3.1 for the
circuit, about 87%). The last line is the speed of the path patching that discovery rests on:
the fast path against the plain per-sender reference on the heads of a few layers.

    python benchmarks/ioi_circuit.py                     # smollm2-135m, 40 prompts
    python benchmarks/ioi_circuit.py --n 100 --eval-n 100
    python benchmarks/ioi_circuit.py --model tiny-llama  # a quick run on a tiny model

``--n`` prompts are used to find the circuit and to measure its completeness and minimality;
its faithfulness is measured on those and on ``--eval-n`` prompts (default 100; the first
``--n`` of them are the discovery prompts).
"""

from __future__ import annotations

import argparse
import time

import torch

import circuitkit as ck
from circuitkit.interface.ioi_summary import table as _table

PAPER = {"heads": 26, "model": 3.56, "circuit": 3.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=40, help="prompts to find the circuit (40)")
    parser.add_argument("--eval-n", type=int, default=100, help="prompts for faithfulness (100)")
    parser.add_argument("--n-random", type=int, default=4, help="random sets for completeness")
    parser.add_argument("--greedy", type=int, default=2, help="greedy steps for completeness")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    if args.model.startswith("tiny-"):
        model = ck.tiny_model(args.model.removeprefix("tiny-"), n_layers=4).to(args.device)
    else:
        model = ck.load_model(args.model, device=args.device)
    eval_n = args.eval_n
    full = ck.IOIDataset(model, n=max(args.n, eval_n), seed=0)
    ds, evaluation = full[: args.n], full[:eval_n]
    abc, eval_abc = ds.corrupted("ABC"), evaluation.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    print(f"model {args.model}, {model.cfg.n_layers} layers x {model.cfg.n_heads} heads; "
          f"discovery on n={ds.n}, evaluation on n={evaluation.n}, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip

    start = time.perf_counter()
    circuit = ck.find_ioi_circuit(model, ds, reference=abc, metric=metric, progress=False)
    found_in = time.perf_counter() - start
    print(
        f"\nfind_ioi_circuit: {found_in:.1f} s  (rounds: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in circuit.info["seconds"].items())
        + ")"
    )
    print()
    print(circuit)

    attention = circuit.info["attention"].values
    scores = circuit.info["head_scores"].values
    base = circuit.info["base"]
    _, cache = model.run_with_cache(ds.tokens.to(model.cfg.device))
    dla = ck.direct_logit_attribution(model, cache, ds, by="head").values
    del cache
    start = time.perf_counter()
    patching = ck.activation_patching(
        model, ds, abc, "head", metric, direction="noise", positions=["end"], progress=False
    )
    patched_in = time.perf_counter() - start
    activation = patching.values[..., 0] - base
    print(f"\nunpatched logit difference {base:.3f}; activation patching of every head at end "
          f"(noising) took {patched_in:.1f} s")  # fmt: skip
    titles = {
        "direct": "heads -> logits",
        "queries": "heads -> queries at end of the heads that carry the answer",
        "s2": "heads -> values at S2 of the s-inhibition heads",
        "s1+1": "heads -> keys at S1+1 of the induction heads",
    }
    roles = {(n.head.layer, n.head.head, n.head.pos): n.role for n in circuit.nodes}
    position = {"direct": "end", "queries": "end", "s2": "S2", "s1+1": "S1+1"}
    for step, title in titles.items():
        if step not in circuit.info:
            continue
        result = circuit.info[step]
        changes = result.examples - circuit.info["base_examples"].to(result.examples)
        effect = changes.mean(-1)
        z = effect / (changes.std(-1) / changes.shape[-1] ** 0.5).clamp(min=1e-12)
        order = effect.flatten().abs().argsort(descending=True)[:12].tolist()
        rows = []
        for i in order:
            layer, head = divmod(i, model.cfg.n_heads)
            rows.append(
                [
                    f"{layer}.{head}",
                    f"{float(effect[layer, head]):+.3f}",
                    f"{float(z[layer, head]):+.1f}",
                    *(f"{float(x):.2f}" for x in attention[layer, head]),
                    *(f"{float(x):.2f}" for x in scores[layer, head]),
                    f"{float(dla[layer, head]):+.3f}",
                    f"{float(activation[layer, head]):+.3f}",
                    roles.get((layer, head, position[step]), ""),
                ]
            )
        headers = ["head", "effect", "z", "end>IO", "end>S1", "end>S2", "prev", "S2>S1",
                   "S2>S1+1", "DLA", "act.patch", "class"]  # fmt: skip
        print(
            f"\npath patching, {title} ({result.info['receivers'][:4]}"
            f"{' ...' if len(result.info['receivers']) > 4 else ''}): the 12 largest |effect|"
        )
        print(_table(headers, rows, align="<>>>>>>>>>><"))

    kwargs = dict(reference=abc, metric=metric, progress=False)
    eval_kwargs = dict(reference=eval_abc, metric=ck.metrics.logit_diff(evaluation), progress=False)
    print()
    for name, prompts, given in (
        ("discovery", ds, kwargs),
        ("evaluation", evaluation, eval_kwargs),
    ):
        start = time.perf_counter()
        faithful = ck.faithfulness(model, circuit, prompts, **given)
        low, high = faithful.ci(0.95)
        print(
            f"faithfulness on the {name} prompts (n={prompts.n}): {faithful}  95% interval "
            f"{100 * low:.1f}%..{100 * high:.1f}%  ({time.perf_counter() - start:.1f} s)"
        )
    cumulative = []
    for upto in ("direct", "queries", "s2", "s1+1"):
        keep = {"direct": ("end",), "queries": ("end",), "s2": ("end", "S2"),
                "s1+1": ("end", "S2", "S1+1")}[upto]  # fmt: skip
        if upto == "direct":
            nodes = [n for n in circuit.nodes if n.role in DIRECT]
        else:
            nodes = [n for n in circuit.nodes if n.head.pos in keep]
        part = ck.Circuit(tuple(nodes))
        f = ck.faithfulness(model, part, evaluation, **eval_kwargs)
        cumulative.append([f"up to round '{upto}'", str(len(part)), f"{f.f_circuit:.3f}",
                           f"{100 * f.ratio:.1f}%"])  # fmt: skip
    print(f"\nfaithfulness as the rounds are added (n={evaluation.n}):")
    print(_table(["circuit", "heads", "F(C)", "F(C)/F(M)"], cumulative, align="<>>>"))

    start = time.perf_counter()
    complete = ck.completeness(
        model, circuit, ds, n_random=args.n_random, greedy=args.greedy, **kwargs
    )
    rows = [
        [label, ", ".join(heads) or "-", f"{float(v[0]):.3f}", f"{float(v[1]):.3f}",
         f"{float(gap):.3f}"]
        for label, heads, v, gap in zip(complete.labels["set"], complete.info["sets"],
                                        complete.values, complete.info["incompleteness"],
                                        strict=True)
    ]  # fmt: skip
    print(f"\ncompleteness on n={ds.n} ({time.perf_counter() - start:.1f} s): F(C\\K), F(M\\K)")
    print(_table(["K", "heads", "F(C\\K)", "F(M\\K)", "|gap|"], rows, align="<<>>>"))

    if not len(circuit):
        print("\nno heads were found; nothing more to evaluate")
        return
    start = time.perf_counter()
    minimal = ck.minimality(model, circuit, ds, **kwargs)
    rows = [
        [label, ", ".join(k) or "-", f"{float(v):+.3f}", f"{100 * float(r):.1f}%"]
        for label, k, v, r in zip(minimal.labels["head"], minimal.info["k"], minimal.values,
                                  minimal.info["relative"], strict=True)
    ]  # fmt: skip
    print(
        f"\nminimality on n={ds.n} ({time.perf_counter() - start:.1f} s): "
        "F(C\\(K+v)) - F(C\\K), and |that| as a share of F(M)"
    )
    print(_table(["head v", "K", "difference", "of F(M)"], rows, align="<<>>"))

    print(
        f"\nthe IOI paper, GPT-2 small: {PAPER['heads']} heads, F(M) = {PAPER['model']}, "
        f"F(C) about {PAPER['circuit']}, F(C)/F(M) about "
        f"{100 * PAPER['circuit'] / PAPER['model']:.0f}%"
    )
    print(
        f"this run, {args.model}: {len(circuit)} heads, F(M) = {faithful.f_model:.2f}, "
        f"F(C) = {faithful.f_circuit:.2f}, F(C)/F(M) = {100 * faithful.ratio:.1f}%"
    )

    # The speed of path patching, on the heads of a few layers before the name movers.
    layers = sorted({n.head.layer for n in circuit.nodes if n.head.pos == "end"})[:1] or [0]
    senders = [ck.Head(layer, h) for layer in layers for h in range(model.cfg.n_heads)]
    timings = {}
    for reference in (False, True):
        start = time.perf_counter()
        out = ck.path_patching(model, ds, abc, senders, "logits", metric, reference=reference,
                               progress=False)  # fmt: skip
        timings[reference] = (time.perf_counter() - start, out)
    agree = torch.allclose(timings[False][1].values, timings[True][1].values, atol=1e-3)
    print(
        f"path patching heads -> logits, {len(senders)} senders of layer {layers}, "
        f"n={ds.n}: fast {timings[False][0]:.1f} s, reference {timings[True][0]:.1f} s, "
        f"agree {agree}, ratio {timings[True][0] / timings[False][0]:.1f}x"
    )


DIRECT = ("name mover", "negative name mover", "other direct", "other negative direct")


if __name__ == "__main__":
    main()
