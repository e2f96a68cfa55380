"""VIF (Do et al., ECCV 2022): a VAE filter trained on the clean budget in front of the deployed classifier."""

import pytest

from bdbench.defenses import DEFENSES, DefenseKind
from bdbench.errors import ConfigError

from defense_fixtures import check_input_filter_repair


def test_vif_is_a_repair_and_rejects_bad_settings():
    assert DEFENSES.get("vif").kind is DefenseKind.MODEL_REPAIR
    for params in [{"steps": 0}, {"kl_weight": -1}]:
        with pytest.raises(ConfigError, match="vif"):
            DEFENSES.build("vif", params)


def test_the_filtered_model_loses_the_backdoor_and_keeps_clean_accuracy(badnets, effect):
    check_input_filter_repair(badnets, effect, "vif", 450)
