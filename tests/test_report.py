"""report.html: self-contained, and a real browser (headless Chromium) draws its plots."""

import json
import re
import shutil
import subprocess

import pytest

from dpokit.errors import DpokitError
from dpokit.report import PALETTE, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                                              "(Debian: apt-get install -y chromium)")


def _run_dir(tmp_path):
    rows = []
    for step in range(1, 21):
        rows.append({"step": step, "loss": 0.7 - 0.02 * step, "rewards/accuracies": min(1.0, 0.5 + step / 40),
                     "rewards/margins": 0.05 * step, "rewards/chosen": 0.02 * step, "rewards/rejected": -0.03 * step,
                     "logps/chosen": -30.0 + step, "logps/rejected": -31.0 - step, "grad_norm": 1.0 / step,
                     "learning_rate": 1e-6, "epoch": step / 20})
        if step % 5 == 0:
            rows.append({"step": step, "eval_loss": 0.72 - 0.02 * step, "eval_rewards/accuracies": 0.5,
                         "eval_sample/kl": 0.1 * step})
    rows.append({"step": 21, "loss": float("nan")})  # a non-finite value is skipped, not drawn
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 22, "lo')
    (tmp_path / "config.yaml").write_text("model: tiny-llama\nbeta: 0.25\nloss_type: sigmoid\n")
    return tmp_path


def _chromium(*args, timeout=120):
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", "--hide-scrollbars", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_is_self_contained_and_reflects_the_metrics(tmp_path):
    page = write_report(_run_dir(tmp_path)).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "<script" not in page and "@import" not in page
    assert "model: tiny-llama" in page and "beta: 0.25" in page and "20 steps" in page
    paths = {m: d for d, m in re.findall(r'<path d="([^"]+)" class="series" data-metric="([^"]+)"', page)}
    assert {"loss", "eval_loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "eval_sample/kl", "grad_norm"} <= set(paths)
    loss_y = [float(p.split(",")[1]) for p in paths["loss"].split()]
    assert len(loss_y) == 20  # the NaN row and the torn last line are left out
    assert all(b > a for a, b in zip(loss_y, loss_y[1:]))  # falling loss: each point lower on the page
    with pytest.raises(DpokitError, match="no metrics.jsonl"):
        write_report(tmp_path / "nowhere")


@needs_chromium
def test_chromium_draws_the_plots(tmp_path):
    report = write_report(_run_dir(tmp_path))
    dom = _chromium("--dump-dom", report.as_uri())
    panels = re.findall(r'<figure class="panel" data-title="([^"]+)"', dom)
    assert panels[:6] == ["Loss", "Reward accuracy", "Reward margin", "Rewards: chosen / rejected",
                          "Log-probs: chosen / rejected", "KL(π ‖ π_ref)"]
    drawn = re.findall(r'<path d="([^"]+)"[^>]*data-metric="([^"]+)"', dom)
    assert all(d.count("L") >= 3 for d, _ in drawn) and len(drawn) >= 10

    shot = tmp_path / "shot.png"
    _chromium("--window-size=1000,2200", f"--screenshot={shot}", report.as_uri())
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)

    def count(hex_color, tol=40):
        want = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels - want).sum(-1) <= tol).sum())

    # the first two series colours are stroked across many panels: thousands of pixels each
    assert count(PALETTE[0]) > 2000 and count(PALETTE[1]) > 1000


def _grid(path, color, size=(16, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.read_bytes()


def test_sample_grids_are_embedded_base_first_with_their_prompts(tmp_path):
    """samples/*/grid.png become data-URI images in a Samples section: base, trained, then any other folder by
    name, each under its folder's name, rows labelled with prompts.json's prompts (escaped); none, no section."""
    import base64

    run = _run_dir(tmp_path)
    assert "Samples" not in write_report(run).read_text()
    grids = {name: _grid(run / "samples" / name / "grid.png", color)
             for name, color in (("trained", "red"), ("zeta", "green"), ("base", "blue"))}
    (run / "samples" / "base" / "prompts.json").write_text(json.dumps(["a <red> cat", 2]))
    page = write_report(run).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # still nothing fetched
    figures = re.findall(r'<figure class="sample" data-name="([^"]+)"><figcaption>([^<]+)</figcaption>', page)
    assert figures == [("base", "base"), ("trained", "trained"), ("zeta", "zeta")]
    images = [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]
    assert images == [grids["base"], grids["trained"], grids["zeta"]]
    assert "<span>a &lt;red&gt; cat</span><span>2</span>" in page
    sizes = re.findall(r'<img [^>]*width="(\d+)" height="(\d+)"', page)
    assert sizes[:2] == [("256", "128"), ("128", "64")]  # small cells scaled up to >= 64 px: 4-px rows ×16, 8-px ×8
