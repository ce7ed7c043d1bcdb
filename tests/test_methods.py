"""Every registered method carries the whole protocol of selfsup.methods.base.Method - defaults,
options, presets, demo settings, linear protocol with its source, run definition, loss and
momentum schedule - and a method missing a piece is named as incomplete, never given another
method's value."""

import argparse

import pytest
import torch
from helpers import TINY_OPTIONS, tiny_flags
from test_builder import images, tiny_encoder

import main_pretrain
from selfsup import config, recipes
from selfsup.errors import UsageError
from selfsup.methods import METHODS, Method, check_complete, protocol_problems
from selfsup.resume import RUN_DEFINING, run_definition

LINEAR_FLAGS = ("optimizer", "nesterov", "wd", "cos", "schedule", "epochs")


def parser_defaults() -> dict[str, object]:
    return {a.dest: a.default for a in main_pretrain.get_args_parser()._actions}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_every_piece_of_the_protocol(name):
    cls = METHODS[name]
    own = vars(cls)  # set by the method's own class, not inherited from Method's placeholders
    flags = parser_defaults()
    assert cls.name == name
    # Defaults and options, in main_pretrain.py's flag names.
    assert isinstance(own["defaults"], dict) and set(own["defaults"]) - {"lr_per_256"} <= set(flags)
    assert isinstance(own["flag_options"], dict) and set(own["flag_options"]) <= set(flags)
    # Presets: its small-image one among them, each titled and sourced, in flag names, in the table.
    assert f"small-{name}" in own["presets"]
    for preset, recipe in own["presets"].items():
        assert recipe["title"] and recipe["source"], preset
        assert set(recipe) - set(config.INFO_KEYS) <= set(flags), preset
        assert recipes.PRESETS[preset] == {"method": name, **recipe}
    # Demo settings.
    assert isinstance(own["demo"], dict) and set(own["demo"]) <= set(flags)
    # Its linear protocol, with where it comes from.
    linear = own["linear"]
    assert set(LINEAR_FLAGS) <= set(linear) and ("lr" in linear or "lr_per_256" in linear) and linear["source"]
    # Its run definition: every option that changes the weights defines the run.
    assert set(cls.flag_options) - {"batch_size"} <= set(own["run_defining"])
    assert set(run_definition({"method": name})) == set(RUN_DEFINING) | set(own["run_defining"])
    # Its loss: a finite scalar with a gradient, and the embeddings the collapse signal reads.
    torch.manual_seed(0)
    model = cls(tiny_encoder, dim=8, **TINY_OPTIONS[name])
    loss = model(*images(n=4), return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert model.last_z is not None and model.last_z.shape == (4, 8)
    # Its momentum schedule: a momentum in [0, 1] that never falls, for a method with a momentum
    # network; None for one without.
    if hasattr(model, "encoder_k"):
        ms = [model.momentum_at(t) for t in (0.0, 0.5, 1.0)]
        assert all(isinstance(m, float) for m in ms) and 0 <= ms[0] <= ms[1] <= ms[2] <= 1
    else:
        assert model.momentum_at(0.5) is None
    assert set(cls.networks) <= {n for n, _ in model.named_children()}
    assert protocol_problems(cls) == []


def _copy_of(cls, **changes):
    """A method with `cls`'s pieces (changes applied; None drops a piece), subclassing Method
    itself, so that nothing is inherited from `cls`."""
    pieces = {k: v for k, v in vars(cls).items()
              if k in ("name", "defaults", "flag_options", "presets", "demo", "linear", "run_defining", "networks",
                       "__init__", "prepare", "objective", "finish", "forward")}
    pieces.update(changes)
    return type("Copy", (Method,), {k: v for k, v in pieces.items() if v is not None})


@pytest.mark.parametrize("change,named", [
    ({"defaults": None}, "no `defaults`"),
    ({"flag_options": None}, "no `flag_options`"),
    ({"presets": None}, "no `presets`"),
    ({"demo": None}, "no `demo`"),
    ({"linear": None}, "no `linear`"),
    ({"run_defining": None}, "no `run_defining`"),
    ({"objective": None}, "no `objective`"),
    ({"linear": {k: v for k, v in METHODS["simclr"].linear.items() if k != "source"}}, "lacks source"),
    ({"linear": {k: v for k, v in METHODS["simclr"].linear.items() if k != "lr_per_256"}}, "lacks lr or lr_per_256"),
    ({"presets": {"simclr": METHODS["simclr"].presets["simclr"]}}, "no small-image preset `small-simclr`"),
    ({"presets": {"small-simclr": {"arch": "resnet18", "source": "x"}}}, "preset `small-simclr` has no `title`"),
    ({"run_defining": ("moco_dim", "moco_t", "bn_splits")}, "leaves out options that change the weights it trains: "
                                                           "['mlp_dim']"),
])
def test_a_method_missing_a_piece_is_named_and_refused_at_registration(change, named):
    assert protocol_problems(_copy_of(METHODS["simclr"])) == []  # the copy itself is complete
    broken = _copy_of(METHODS["simclr"], **change)
    assert any(named in problem for problem in protocol_problems(broken)), protocol_problems(broken)
    with pytest.raises(TypeError, match="is incomplete"):
        check_complete({"simclr": broken})


def test_every_method_has_tiny_test_options_and_its_flags_give_them():
    assert set(TINY_OPTIONS) == set(METHODS)
    for name, cls in METHODS.items():
        args = main_pretrain.resolve_config(main_pretrain.get_args_parser().parse_args(
            ["--method", name, *tiny_flags(name), "-b", "8"]))
        assert TINY_OPTIONS[name].items() <= cls.options(vars(args)).items(), name


def test_every_layered_flag_is_unset_unless_given():
    # A flag takes the layers' value only while it is None: each key some layer sets must be a
    # flag of main_pretrain.py whose default is None.
    flags = parser_defaults()
    assert [k for k in recipes.CONFIG_KEYS if k not in flags or flags[k] is not None] == []


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_gets_its_own_linear_protocol_never_mocos(name):
    args = argparse.Namespace(batch_size=512, **{k: None for k in recipes.PROTOCOL_FLAGS})
    line = recipes.linear_protocol(args, name)
    protocol = METHODS[name].linear
    assert args.lr == pytest.approx(protocol.get("lr") or protocol["lr_per_256"] * 2)
    assert (args.epochs, args.nesterov, args.cos) == (protocol["epochs"], protocol["nesterov"], protocol["cos"])
    assert f"{name}'s protocol, from {protocol['source']}" in line


def test_a_method_without_a_protocol_here_needs_every_flag():
    args = argparse.Namespace(batch_size=256, **{k: None for k in recipes.PROTOCOL_FLAGS}, )
    args.lr = 0.5
    with pytest.raises(UsageError, match="'swav', which has no linear-evaluation protocol.*--optimizer --nesterov"):
        recipes.linear_protocol(args, "swav")
    full = argparse.Namespace(batch_size=256, optimizer="sgd", lr=0.5, nesterov=False, wd=0.0, cos=True, schedule=[],
                              epochs=5)
    assert "the flags given (the checkpoint's method 'swav'" in recipes.linear_protocol(full, "swav")
    # A checkpoint recording no method (facebookresearch/moco's) keeps MoCo's, the scripts' defaults.
    none = argparse.Namespace(batch_size=256, **{k: None for k in recipes.PROTOCOL_FLAGS})
    assert "MoCo's protocol (the checkpoint records no method)" in recipes.linear_protocol(none, None)
    assert none.lr == 30.0


# Every key a run record held when each record listed every method's keys, the other methods'
# unset (None) or at their flag's default.
ALL_METHODS_RUN_KEYS = ("data", "method", "arch", "small_stem", "image_size", "aug", "batch_size", "lr", "optimizer",
                        "momentum", "wd", "cos", "schedule", "warmup_epochs", "classic_momentum", "lars_eta", "moco_dim",
                        "moco_k", "moco_m", "moco_t", "moco_m_cos", "mlp", "mlp_dim", "bn_splits", "shuffle_bn",
                        "sync_bn", "amp", "seed")


@pytest.mark.parametrize("name", list(METHODS))
def test_run_records_listing_every_methods_keys_still_resume_and_still_guard(name, tmp_path):
    from selfsup.resume import check_same_run

    args = vars(main_pretrain.resolve_config(main_pretrain.get_args_parser().parse_args(
        [str(tmp_path), "--method", name, "-b", "8"])))
    old = {k: args.get(k) for k in ALL_METHODS_RUN_KEYS}
    old["data"] = str(tmp_path.resolve())
    assert check_same_run(old, run_definition(args), tmp_path, accept=False) == []
    key = next(k for k in METHODS[name].run_defining if isinstance(args[k], (int, float)) and args[k] is not True)
    changed = {**old, key: args[key] * 2}
    with pytest.raises(UsageError, match=f"{key} "):
        check_same_run(changed, run_definition(args), tmp_path, accept=False)


def test_the_recipe_book_and_the_readme_name_every_preset_and_protocol(repo):
    book = (repo / "docs" / "CONFIG.md").read_text()
    readme = (repo / "README.md").read_text()
    for name, recipe in recipes.PRESETS.items():
        assert f"--preset {name}" in book and f"`{name}`" in readme, name
    for name, cls in METHODS.items():
        assert f"| `{name}` |" in book and cls.linear["source"] in book, name
