"""Golden fixtures: seeded inputs and refq's outputs, for checking other implementations.

    refq golden write DIR [--methods M ...] [--model PATH | --no-real] [--force]
    refq golden verify DIR [--impl MODULE[:NAME]] [--tier decode|steps|e2e ...]
                           [--kernel cpu|cpu-int|dequant|gpu] [--methods M ...] [--cases NAME ...] [--json]

The package (GOLDEN.md has the full specification):
  spec.py    what a porter reads: inputs, cases, the neutral form, tolerances, e2e bands
  steps.py   the teacher-forced sub-steps (kinds, references, judges, traces)
  io.py      the safetensors writer/reader, JSON, sha256, manifest
  write.py   `write`;  verify.py `verify`;  cli.py the subcommands
"""
from refq.golden.io import dump_json, load_safetensors, read_manifest, safetensors_bytes
from refq.golden.spec import (CASES, KNOWN_SUITE_VERSIONS, SUITE, SUITE_VERSION, SYNTHETIC, TIERS,
                              cases_for, decode_neutral, make_real, make_synthetic,
                              neutral_fields)
from refq.golden.write import refq_outputs, write_suite
from refq.golden.verify import load_impl, summary_line, verify_suite
from refq.golden.cli import add_commands, cmd_golden_verify, cmd_golden_write

__all__ = ["SUITE", "SUITE_VERSION", "KNOWN_SUITE_VERSIONS", "TIERS", "SYNTHETIC", "CASES",
           "cases_for", "make_synthetic", "make_real", "neutral_fields", "decode_neutral",
           "safetensors_bytes", "load_safetensors", "read_manifest", "dump_json",
           "refq_outputs", "write_suite", "verify_suite", "load_impl", "summary_line",
           "add_commands", "cmd_golden_write", "cmd_golden_verify"]
