"""Recipe schemas and their handling.

``base`` (the strict model every recipe section derives from, and registry-backed fields), ``common``
(sections every training command shares), one schema module per stage (``pretrain``, ``teacher``,
``distill``), ``recipes`` (kind -> schema), ``loading`` (finding, reading and validating recipe files),
``overrides`` (``key.sub=value``), ``errors`` (one message per invalid recipe) and ``fingerprint``.

This file imports nothing: import the module you need, so no package-level import cycle can form.
"""
