"""Each method declares its parameters: `cbir methods` prints them, bad values fail at construction."""

import inspect
import json

import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.models import METHODS, ModelError, create_model, method_class, method_params
from tests.conftest import KAGGLE_MINI

runner = CliRunner()


def test_methods_lists_every_parameter_with_default_and_meaning():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in METHODS:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        listed = method_params(name)
        assert listed, name
        for offset, (param, default, spec) in enumerate(listed, start=1):
            line = lines[start + offset]
            assert line.startswith(f"    {param} = {json.dumps(default)}: {spec.meaning} ("), line
    assert "    alpha = null: ridge regularisation" in result.output
    assert "    ensemble = 2: heads trained with different seeds and averaged (an integer in [1, inf))" in (
        result.output
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_parameter_is_declared_or_refused(name):
    """A parameter added to a signature without a declaration (meaning, allowed values) fails here."""
    cls = method_class(name)
    signature = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    declared = cls.param_specs()
    assert set(declared) <= set(signature)
    for param in set(signature) - set(declared):  # another classical mapping's parameters
        with pytest.raises(ModelError, match=f"'{param}'|{param}"):
            create_model(name, **{param: 1})


@pytest.mark.parametrize(
    ("method", "param", "value", "allowed"),
    [
        ("contrastive", "ensemble", 0, "an integer in [1, inf)"),
        ("contrastive", "dropout", 1.0, "a number in [0, 1)"),
        ("ridge", "alpha", -1, "a number in (0, inf) or null"),
        ("ridge", "folds", 2.5, "an integer in [2, inf)"),
        ("cca", "n_components", True, "an integer in [1, inf) or null"),
        ("kernel-ridge", "kernel", "linear", "one of rbf, poly"),
        ("autoencoder", "loss", "hinge", "one of mse, triplet"),
        ("zero-shot", "temperature", 0, "a number in (0, inf)"),
        ("fusion", "step", 0.75, "a number in (0, 0.5]"),
    ],
)
def test_bad_values_name_the_parameter_and_the_allowed_range(method, param, value, allowed):
    members = {"members": ["a", "b"]} if method == "fusion" else {}
    with pytest.raises(ModelError) as caught:
        create_model(method, **members, **{param: value})
    assert str(caught.value) == f"{method}: parameter {param} must be {allowed}, not {value!r}"


def test_edge_values_inside_the_range_are_accepted():
    create_model("contrastive", hidden=0, bank_size=0, dropout=0.0, ensemble=1)
    create_model("ridge", alpha=1e-6, folds=2, direction=None)
    create_model("zero-shot", visual_weight=0, top_k=1)
    create_model("fusion", members=["a", "b"], step=0.5)


def test_cli_train_refuses_a_bad_parameter_before_reading_data(tmp_path):
    out = tmp_path / "m"
    r = runner.invoke(
        app, ["train", "-d", str(KAGGLE_MINI), "--method", "ridge", "-p", "alpha=-1", "-o", str(out)]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "ridge: parameter alpha must be a number in (0, inf) or null, not -1" in " ".join(r.output.split())
    assert not out.exists()
