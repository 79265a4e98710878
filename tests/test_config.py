import pytest

from dpokit.config import TrainConfig, load_config
from dpokit.errors import DpokitError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.3\nlearning_rate: 1e-4\nloss_type: ipo\nlora: {r: 4}\n")
    cfg = load_config(path, ["beta=0.5", "max_steps=7", "loss_type=sigmoid,ipo"])
    assert cfg.beta == 0.5 and cfg.max_steps == 7
    assert cfg.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; the config takes it
    assert cfg.loss_types == ["sigmoid", "ipo"]
    assert cfg.lora == {"r": 4}


def test_saved_config_round_trips(tmp_path):
    cfg = TrainConfig(beta=0.25, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], model="m")
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, needle", [
    ("betta=0.1", "unknown config key(s): betta"),
    ("beta=fast", "'beta' expects float"),
    ("max_steps=true", "'max_steps' expects int"),
    ("max_steps", "not of the form key=value"),
    ("beta=-1", "beta must be > 0"),
])
def test_bad_values_are_named(override, needle):
    with pytest.raises(DpokitError, match=None) as err:
        load_config(None, [override])
    assert needle in str(err.value)
