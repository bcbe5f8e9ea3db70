"""Every field of the training configs can be overridden on the command line (the training
issue: "any field overridable, --config.total_steps=..."): ml_collections' config_flags refuses
to override a field whose value is None, so no leaf may be None."""

import os

from absl import flags
from ml_collections import config_flags
from ml_collections.config_dict import ConfigDict
import pytest

from configs import testbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaves(c: ConfigDict, prefix=""):
  for k, v in c.items():
    if isinstance(v, ConfigDict):
      yield from leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def parse(spec, *overrides):
  argv = ["prog", f"--config={os.path.join(ROOT, spec)}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("spec", ["configs/testbed.py", "configs/testbed.py:stage11",
                                  "configs/testbed.py:smoke", "configs/finetune.py"])
def test_no_field_is_none(spec):
  none = [k for k, v in leaves(parse(spec)) if v is None]
  assert not none, f"{spec}: fields {none} are None, which --config.<field>=... cannot set"


def test_overrides_reach_the_config():
  c = parse("configs/testbed.py:stage6", "--config.compute_dtype=float32",
            "--config.posemb_sincos=0.5", "--config.init=", "--config.total_steps=7")
  assert (c.compute_dtype, c.posemb_sincos, c.init, c.total_steps) == ("float32", 0.5, "", 7)
  assert testbed.get_config("stage6").compute_dtype == "bfloat16"
