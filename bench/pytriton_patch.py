"""Make PyTriton 0.7.0's Python stub work with this machine's Python 3.11.7.

The stub embeds a libpython 3.11 older than 3.11.6, whose C RLock lacks `_recursion_count`, while the
3.11.7 standard library's multiprocessing.resource_tracker calls it, so every model load fails with
AttributeError (triton-inference-server/pytriton issue #51). The pure-Python RLock of the same standard
library has the method. Triton's stub ignores PYTHONPATH (a sitecustomize is never loaded), so the fix
is appended to the proxy module the stub imports (pytriton/proxy/data.py) inside bench/.venv-pytriton.
Idempotent; `make bench` runs it after creating that environment.

    bench/.venv-pytriton/bin/python bench/pytriton_patch.py
"""
from pathlib import Path

import pytriton.proxy.data as data

MARK = "# gen bench: resource tracker RLock fix"
FIX = f"""
{MARK}
import threading as _threading
if not hasattr(_threading.RLock(), "_recursion_count"):
    from multiprocessing import resource_tracker as _resource_tracker
    _resource_tracker._resource_tracker._lock = _threading._PyRLock()
"""

path = Path(data.__file__)
text = path.read_text()
if MARK not in text:
    path.write_text(text + FIX)
print(f"patched {path}")
