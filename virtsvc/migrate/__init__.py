"""Other tools' stubs -> virtsvc scenario files (``virtsvc import gripmock``).

An importer reads the stubs, says per stub what it cannot express (``file:line: message``), and writes
scenario files that ``virtsvc check`` passes; it never serves anything itself.
"""

from __future__ import annotations

from virtsvc.migrate.gripmock import Imported, import_gripmock

__all__ = ["Imported", "import_gripmock"]
