"""nas: structured pruning and distillation of HF causal LMs, and the search over their children.

`nas.load(path)` is `nas.loader.load`: the model of a child folder, per-layer or not. It is imported on first use,
so that `import nas` (the CLI's start) stays light."""


def __getattr__(name: str):
    if name in ("load", "build"):
        from nas import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'nas' has no attribute {name!r}")
