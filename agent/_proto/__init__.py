"""Code generated from proto/ by proto/generate.py: do not edit, regenerate.

Only controller_stub/convert.py and agent/service/convert.py import these modules (the
adapters to the project's own types); tests/controller/test_proto.py fails when they are
stale.
"""
