"""Training recipes: each family trains with its published setup by default, every flag overrides it, and the
checkpoint, metrics.json and the bundle record which setup ran and how training ended."""

import json

import pytest
import torch

from timecma.core.config import TrainConfig
from timecma.core.errors import InputError
from timecma.core.recipes import ETA_MIN, RECIPES, cosine_t_max, outside_source, recipe_for

from conftest import run_cli

SMALL = ["--seq-len", "24", "--pred-len", "12", "--device", "cpu"]


def train(data, out, *args):
    return run_cli("timecma.cli:train_cmd", "--data", str(data), "--out", str(out), *SMALL, *args)


def test_each_family_gets_its_published_recipe_per_horizon():
    assert recipe_for("dlinear", 96).name == "ltsf-linear"
    ref = recipe_for("timecma-no-llm", 96)
    assert ref is recipe_for("timecma", 192) and ref.name == "timecma-reference"
    assert (ref.optimizer, ref.lr, ref.schedule, ref.cosine_period, ref.batch_size, ref.epochs, ref.shuffle,
            ref.seed) == ("adamw", 1e-4, "cosine", 50, 16, 100, False, 2024)
    assert ref.model == {"channel": 64, "e_layer": 1, "d_layer": 2, "dropout": 0.7}
    assert recipe_for("timecma", 336).epochs == 120
    assert recipe_for("timecma", 720).model == {"channel": 32, "e_layer": 2, "d_layer": 2, "dropout": 0.8}
    lin = RECIPES["ltsf-linear"]
    assert (lin.optimizer, lin.lr, lin.schedule, lin.batch_size, lin.epochs, lin.patience, lin.weight_decay,
            lin.clip) == ("adam", 1e-3, "halve", 32, 10, 3, 0.0, None)  # lr: the module docstring says why
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_for("dlinear", 96, "nope")
    assert outside_source(ref, "ETTh1.csv", 96, 336) is None  # what the script published
    assert outside_source(ref, "weather.parquet", 48, 24).endswith("data weather.parquet, lookback 48, horizon 24")


def test_dataclass_defaults_are_the_reference_recipe_and_flags_are_listed_as_overrides():
    ref = recipe_for("timecma", 96)
    assert TrainConfig.from_recipe(ref) == TrainConfig()  # the docstring's claim
    cfg = TrainConfig.from_recipe(RECIPES["ltsf-linear"], ["channel"], lr=1e-3, epochs=4, clip=0, seed=None)
    assert cfg.recipe == "ltsf-linear" and cfg.epochs == 4 and cfg.clip is None and cfg.seed == 2021
    assert cfg.overrides == ["channel", "epochs"]  # lr 1e-3 and clip none are the recipe's own values
    assert RECIPES["timecma-reference"].model_sizes({"channel": 16, "dropout": 0.7, "e_layer": None}) == \
        ({"channel": 16, "e_layer": 1, "d_layer": 2, "dropout": 0.7}, ["channel"])


def test_the_cosine_period_is_the_reference_min_of_epochs_and_50():
    from timecma.training.loop import make_optimizer

    assert (cosine_t_max(100, 50), cosine_t_max(20, 50), cosine_t_max(10, 0)) == (50, 20, 10)
    for epochs, period in ((4, 50), (3, 0)):  # a short run anneals to the floor by its last epoch
        opt, sched = make_optimizer(torch.nn.Linear(2, 1), TrainConfig(epochs=epochs, cosine_period=period))
        rates = []
        for _ in range(epochs):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert rates[0] == 1e-4 and rates == sorted(rates, reverse=True), rates
        assert opt.param_groups[0]["lr"] == pytest.approx(ETA_MIN)


@pytest.mark.parametrize("bad,named", [({"lr": 0}, "lr 0"), ({"clip": -1.0}, "clip -1.0"),
                                       ({"schedule": "step"}, "schedule 'step'"), ({"patience": 0}, "patience 0"),
                                       ({"weight_decay": -1e-3}, "weight_decay"), ({"joint_weight": 2.0}, "joint_weight")])
def test_impossible_settings_are_refused_before_any_work(bad, named):
    with pytest.raises(InputError, match="training settings refused") as err:
        TrainConfig(**bad)
    assert named in str(err.value)


def test_every_recipe_flag_reaches_the_checkpoint(small_csv, tmp_path):
    out = tmp_path / "flags"
    r = train(small_csv, out, "--model", "dlinear", "--epochs", "1", "--optimizer", "adamw", "--lr", "0.002",
              "--schedule", "cosine", "--cosine-period", "3", "--weight-decay", "0.01", "--clip", "1",
              "--batch-size", "8", "--patience", "2", "--no-shuffle", "--seed", "7")
    assert r.returncode == 0, r.stderr
    tc = torch.load(out / "best.pt", weights_only=True)["train_config"]
    given = dict(optimizer="adamw", lr=0.002, schedule="cosine", cosine_period=3, weight_decay=0.01, clip=1.0,
                 batch_size=8, patience=2, shuffle=False, seed=7, epochs=1)
    assert {k: tc[k] for k in given} == given and tc["recipe"] == "ltsf-linear"
    assert tc["overrides"] == sorted(given)
    r = train(small_csv, tmp_path / "neg", "--model", "dlinear", "--clip", "-1")
    assert r.returncode == 2 and "--clip" in r.stderr and not (tmp_path / "neg").exists()


def test_dlinear_defaults_are_recorded_with_the_overrides_and_the_cap_warns(small_csv, tmp_path):
    out = tmp_path / "dl"
    r = train(small_csv, out, "--model", "dlinear", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "epoch cap" in r.stderr and "undertrained" in r.stderr
    ckpt = torch.load(out / "best.pt", weights_only=True)
    tc = ckpt["train_config"]
    assert (tc["recipe"], tc["optimizer"], tc["schedule"], tc["batch_size"], tc["overrides"]) == \
        ("ltsf-linear", "adam", "halve", 32, ["epochs"])
    t = json.loads((out / "metrics.json").read_text())["training"]
    assert ckpt["metrics"]["training"] == t
    assert t["recipe"] == "ltsf-linear" and t["stop"] == "epoch_cap" and t["budget_limited"]
    assert t["limits"] == ["ended at the epoch cap (2)"] and t["epochs_run"] == 2 and t["llm"] is None
    n_train = json.loads((out / "metrics.json").read_text())["windows"]["train"]
    assert t["optimizer_steps"] == 2 * -(-n_train // 32)
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert hist[0]["lr"] == 1e-3 and hist[1]["lr"] == pytest.approx(5e-4)  # each epoch's own rate, halved after it


@pytest.mark.parametrize("model", ["dlinear", "timecma-no-llm", "timecma"])
def test_a_short_run_of_each_recipe_learns(small_csv, tmp_path, tiny_llm_dir, model):
    """Each family's own recipe, unchanged but for its epoch cap, lowers the training and the validation loss."""
    out = tmp_path / model
    r = train(small_csv, out, "--model", model, "--llm", tiny_llm_dir, "--epochs", "4", "--patience", "4")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    hist = m["history"]
    assert m["training"]["overrides"] == ["epochs", "patience"]
    # lr 1e-4 and dropout 0.7 (timecma-reference) learn slower than LTSF-Linear's 1e-3: a 10% fall in 4 epochs
    assert hist[-1]["train_mse"] < 0.9 * hist[0]["train_mse"], [h["train_mse"] for h in hist]
    assert min(h["val_mse"] for h in hist[1:]) < hist[0]["val_mse"], [h["val_mse"] for h in hist]


def test_early_stop_is_recorded_as_converged(small_csv, tmp_path):
    out = tmp_path / "es"
    r = train(small_csv, out, "--model", "dlinear", "--epochs", "50", "--patience", "1", "--lr", "0.05")
    assert r.returncode == 0, r.stderr
    t = json.loads((out / "metrics.json").read_text())["training"]
    assert t["stop"] == "early_stop" and not t["budget_limited"] and t["epochs_run"] < 50
    assert t["epochs_run"] == t["best_epoch"] + 1 and "epoch cap" not in r.stderr


def test_a_loss_that_is_never_finite_is_a_clear_error(small_csv, tmp_path):
    out = tmp_path / "nan"
    r = train(small_csv, out, "--model", "dlinear", "--epochs", "3", "--lr", "1e30")
    assert r.returncode == 2, r.stderr
    assert "no finite validation loss" in r.stderr and "Lower --lr" in r.stderr
    assert "Traceback" not in r.stderr and not (out / "best.pt").exists()


def test_the_bundle_manifest_records_the_recipe(small_bundle):
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    t = manifest["metrics"]["training"]
    assert t["recipe"] == "timecma-reference" and t["llm"]["made"] == "frozen"
    assert len(t["llm"]["weights_digest"]) == 64
    assert t["overrides"] == ["channel", "d_layer", "epochs"]  # conftest TRAIN_ARGS; its batch 16, e_layer 1 are the recipe's


def test_train_never_replaces_a_file_it_did_not_write(small_csv, tmp_path):
    for name in ("best.pt", "metrics.json"):
        out = tmp_path / name.replace(".", "-")
        out.mkdir()
        (out / name).write_text("the user's own notes")
        r = train(small_csv, out, "--model", "dlinear", "--epochs", "1")
        assert r.returncode == 2 and "refusing to replace" in r.stderr and str(out / name) in r.stderr
        assert (out / name).read_text() == "the user's own notes" and len(list(out.iterdir())) == 1
    for _ in range(2):  # and a run replaces what a run wrote
        r = train(small_csv, tmp_path / "again", "--model", "dlinear", "--epochs", "1")
        assert r.returncode == 0, r.stderr


def test_the_best_epoch_snapshot_copies_what_trains_and_shares_what_is_frozen():
    from timecma.training.loop import snapshot

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)  # a frozen base, as a jointly trained LLM's under LoRA
    best = snapshot(model)
    assert best["0.weight"].data_ptr() == model[0].weight.data_ptr()  # frozen: no copy
    assert best["2.weight"].data_ptr() != model[2].weight.data_ptr()
    with torch.no_grad():
        model[2].weight.add_(1.0)
        model[1].running_mean.add_(1.0)
    assert not torch.equal(best["2.weight"], model[2].weight) and not torch.equal(best["1.running_mean"],
                                                                                  model[1].running_mean)
    model.load_state_dict(best)  # and it restores the whole model
    assert torch.equal(model[2].weight, best["2.weight"])
