"""Draw the README's figures: one static PNG per method, on the offline default model.

Runs a small IOI study (``ck.report.ioi_study``: baseline, logit lens, direct logit
attribution, activation patching, the circuit by path patching), attribution patching and a
causal trace on smollm2-135m, draws each result with ``ck.plot`` / ``ck.plot_circuit`` /
``ck.plot_causal_trace``, and photographs each figure with headless Chromium (Debian's
``chromium``; nothing is fetched from the network). About ten minutes on a 2-core CPU.

    python docs/make_figures.py            # writes docs/figures/*.png
    python docs/make_figures.py --n 16     # more prompts
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import plotly.graph_objects as go
import torch

import circuitkit as ck
from circuitkit.interface.ioi_report import ioi_study

OUT = Path(__file__).parent / "figures"
WIDTH, HEIGHT = 900, 520


def photograph(figure: go.Figure, path: Path, height: int = HEIGHT) -> None:
    """Write ``figure`` as a PNG through headless Chromium."""
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        raise SystemExit("make_figures: needs Chromium (apt install chromium)")
    figure.update_layout(width=WIDTH, height=height, margin=dict(l=60, r=30, t=70, b=50))
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "figure.html"
        figure.write_html(page, include_plotlyjs=True, full_html=True, config={"staticPlot": True})
        subprocess.run(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--user-data-dir={folder}/profile", "--virtual-time-budget=10000",
                f"--window-size={WIDTH + 20},{height + 20}", f"--screenshot={path.resolve()}",
                page.as_uri(),
            ],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (8)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()

    model = ck.load_model("smollm2-135m")
    ds = ck.IOIDataset(model, n=args.n, seed=0)
    study = ioi_study(
        model, ds, discover_n=args.n, patch_n=args.n, sweeps=("resid", "head"), progress=False,
        say=print,
    )  # fmt: skip
    photograph(ck.plot(study.lens, title="Logit lens: logit difference after each layer"),
               OUT / "logit_lens.png")  # fmt: skip
    photograph(ck.plot(study.heads, title="Direct logit attribution by head"),
               OUT / "dla_heads.png")  # fmt: skip
    photograph(ck.plot(study.patching["resid"], title="Denoising the residual stream"),
               OUT / "patching_resid.png")  # fmt: skip
    photograph(ck.plot(study.patching["head"], title="Denoising each head's output"),
               OUT / "patching_heads.png")  # fmt: skip
    assert study.circuit is not None
    photograph(ck.plot(study.circuit.info["direct"], title="Path patching: heads -> logits"),
               OUT / "path_patching.png")  # fmt: skip
    photograph(ck.plot_circuit(study.circuit, title="The IOI circuit of smollm2-135m"),
               OUT / "circuit.png", height=600)  # fmt: skip

    abc = ds.corrupted("ABC")
    metric = ck.metrics.logit_diff(ds)
    ablated = ck.ablation_sweep(model, ds, "head", metric=metric, method="mean", reference=abc,
                                progress=False)  # fmt: skip
    photograph(ck.plot(ablated, title="Mean-ablating each head"), OUT / "ablation.png")
    fast = ck.attribution_patching(model, ds, abc, metric, component="head")
    exact, estimate = study.patching["head"].values.flatten(), fast.values.flatten()
    scatter = go.Figure(go.Scatter(x=exact.tolist(), y=estimate.tolist(), mode="markers"))
    scatter.update_layout(
        title="Attribution patching against exact patching, every head",
        xaxis_title="exact (activation patching)",
        yaxis_title="estimate (attribution patching)",
        template="plotly_white",
    )
    photograph(scatter, OUT / "attribution.png")
    traces = [
        ck.causal_trace(
            model,
            "The Eiffel Tower is located in the city of",
            "Eiffel Tower",
            " Paris",
            kind,
            samples=3,
            progress=False,
        )  # fmt: skip
        for kind in ("resid", "mlp", "attn")
    ]
    photograph(ck.plot_causal_trace(*traces), OUT / "causal_trace.png", height=420)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
