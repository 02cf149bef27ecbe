"""kdprompt: distillation-centric training for CLIP prompt learning.

Stage one trains a prompt-learned teacher and caches its class text features; stage two distills a
compact student image encoder from unlabelled webdataset shards; the student ships with the cached
text features alone.
"""

from kdprompt.version import __version__ as __version__


def __getattr__(name: str):  # lazy: `import kdprompt` stays light for the CLI
    if name in ("load_bundle", "export_bundle", "Bundle", "Prediction"):
        import kdprompt.deploy as deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'kdprompt' has no attribute {name!r}")
