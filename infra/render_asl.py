#!/usr/bin/env python3
"""Renders infra/statemachine.asl.json with DefinitionSubstitutions values, as SAM does.

Usage: render_asl.py KEY=VALUE... < statemachine.asl.json > rendered.json
Used by the test script (asl-validator) with the same placeholder names as template.yaml; a
placeholder left without a value is an error, and a value for a name the definition does not
use is ignored.
"""
import json
import re
import sys

text = sys.stdin.read()
for pair in sys.argv[1:]:
    key, value = pair.split("=", 1)
    text = text.replace("${" + key + "}", value)
leftover = re.findall(r"\$\{(\w+)\}", text)
if leftover:
    sys.exit(f"render_asl.py: no value for {', '.join(sorted(set(leftover)))}")
json.loads(text)  # the rendered definition must be valid JSON
sys.stdout.write(text)
