"""AIF (Do et al., ECCV 2022): the VAE filter trained also against a trigger generator."""

import pytest

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.errors import ConfigError

from defense_fixtures import check_input_filter_repair


def test_aif_is_a_repair_and_rejects_bad_settings():
    assert DEFENSES.get("aif").kind is DefenseKind.MODEL_REPAIR
    for params in [{"mask_bound": 0}, {"batch_size": 1}]:
        with pytest.raises(ConfigError, match="aif"):
            DEFENSES.build("aif", params)


def test_the_filtered_model_loses_the_backdoor_and_keeps_clean_accuracy(badnets, effect):
    check_input_filter_repair(badnets, effect, "aif", 300)
