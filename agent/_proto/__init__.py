"""Code generated from proto/ by proto/generate.py: do not edit, regenerate.

Only controller_stub/convert.py imports these modules (the one adapter to the project's
own types); tests/controller/test_proto.py fails when they are stale.
"""
