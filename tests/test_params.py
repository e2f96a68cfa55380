"""Component parameters are validated from the constructors' annotations (ranges as `Annotated[..., Field(...)]`,
see `bdbench.params`): one line naming the parameter, before any experiment runs or any file is written."""

import inspect

import pytest
from click.testing import CliRunner

from bdbench.attacks import ATTACKS
from bdbench.cli import main
from bdbench.defenses import DEFENSES
from bdbench.errors import ConfigError
from bdbench.registry import _parameter_types


@pytest.mark.parametrize("override, message", [
    ("attacks.1.patch_size=abc", "error: attack 'badnets' parameter 'patch_size' is 'abc': input should be a valid integer"),
    ("defenses.1.epochs=-1", "error: defense 'ft' parameter 'epochs' is -1: input should be greater than or equal to 1"),
])
def test_a_mistyped_or_out_of_range_parameter_is_one_line_naming_it(tmp_path, override, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "demo", "--out", str(out), "--set", override])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert not (out / "results.sqlite").exists()  # refused before any experiment or database


@pytest.mark.parametrize("registry", [ATTACKS, DEFENSES], ids=["attacks", "defenses"])
def test_every_parameter_of_every_attack_and_defense_is_validated(registry):
    """An annotation that cannot be resolved would silently leave its range unchecked."""
    for entry in registry:
        parameters = [p for p in inspect.signature(entry.obj).parameters.values()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unchecked = [p.name for p in parameters if p.name not in _parameter_types(entry.obj)]
        assert not unchecked, f"{registry.kind} {entry.name!r}: {unchecked} have no validator"


def test_direct_construction_is_validated_too():
    from bdbench.attacks.wanet import WaNet
    from bdbench.defenses.strip import Strip

    with pytest.raises(ConfigError, match="^attack 'wanet' parameter 'k' is 1: input should be greater than or equal to 2$"):
        WaNet(k=1)
    with pytest.raises(ConfigError, match="^defense 'strip' parameter 'false_rejection' is 1.0: input should be less than 1$"):
        Strip(false_rejection=1.0)
    assert Strip(overlays=3).overlays == 3  # values reach the constructor as given


def test_reference_entries_are_marked_by_an_attribute():
    assert [e.name for e in ATTACKS if ATTACKS.is_reference(e.name)] == ["none"]
    assert [e.name for e in DEFENSES if DEFENSES.is_reference(e.name)] == ["none"]
    assert not ATTACKS.is_reference("a-plugin-not-installed")
