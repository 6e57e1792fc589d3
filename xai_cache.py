"""The user cache folder, and JAX's persistent compilation cache in it.

A jitted program compiles in every new process (0.3-2 s each on a 2-core CPU for this
project's explainers). With the persistent cache on, the second process on a machine
loads its programs from disk instead. The command lines and the explorer turn it on;
a library user turns it on with one call, never by importing a module:

    import xai_visualizations as xv
    xv.enable_compilation_cache()      # ~/.cache/cifar10-xai/jax
"""

import os
from pathlib import Path
from typing import Optional


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cifar10-xai, else ~/.cache/cifar10-xai."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar10-xai"


def enable_compilation_cache(folder: Optional[os.PathLike] = None) -> Path:
    """Turns on JAX's persistent compilation cache for this process.

    Args:
        folder: where compiled programs are kept; default a folder JAX was already told
            (`JAX_COMPILATION_CACHE_DIR`, `jax.config`; left as it is), else
            `user_cache_dir() / "jax"`.

    Returns:
        The folder in use. Every program is kept, however quickly it compiled: the
        explainers' single-image programs compile in a fraction of a second, which is
        the wait a user sees first. Only a folder you trust: JAX runs what it loads.
    """
    import jax  # noqa: PLC0415 (the cache folder itself needs no JAX)

    if folder is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)  # the user's, with their settings
    chosen = folder or user_cache_dir() / "jax"
    Path(chosen).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return Path(chosen)
