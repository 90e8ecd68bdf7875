"""config_from_options: a PrefConfig from an option mapping (the bench's path) equals the command line's."""

from __future__ import annotations

import pytest

from prefkit.configfile import config_from_options, options_to_argv, parse_config
from prefkit.errors import ConfigError

OPTIONS = [
    {"output_dir": "o"},
    {"output_dir": "o", "learning_rate": "1e-5", "beta": 0.3, "loss_type": ["sigmoid", "sft"],
     "loss_weights": [1.0, "0.5"], "use_peft": "true", "poet": True, "granularity": "adaptive",
     "num_segments": 4, "lr_scheduler_type": "constant", "max_steps": "7", "reward_calibration": False},
    {"output_dir": "o", "reward_calibration": True, "rc_fixed_alpha": "1.0", "bf16": False, "seed": 3},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_a_mapping_gives_the_config_its_command_line_gives(options: dict):
    assert config_from_options(options) == parse_config(options_to_argv(options))


def test_text_values_are_read_as_the_command_line_reads_them():
    cfg = config_from_options({"output_dir": "o", "learning_rate": "1e-5", "use_peft": "yes", "max_steps": "7"})
    assert (cfg.learning_rate, cfg.use_peft, cfg.max_steps) == (1e-5, True, 7)


@pytest.mark.parametrize("options, match", [
    ({"learnig_rate": 1e-5}, r"unknown option --learnig_rate; did you mean --learning_rate\?"),
    ({"use_peft": "maybe"}, r"--use_peft: 'maybe' is not a valid value"),
    ({"max_steps": "seven"}, r"--max_steps: 'seven' is not a valid value"),
    ({"lr_scheduler_type": "wobbly"}, r"--lr_scheduler_type: 'wobbly' is not one of"),
])
def test_a_bad_mapping_names_the_option(options: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        config_from_options({"output_dir": "o", **options})
