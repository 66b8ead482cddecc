"""The CLI: ``python pipeline.py --local | --compile | --submit`` (``--help`` for all options).

``import pipeline`` here finds the ``pipeline/`` package, not this file: a regular package
directory wins over a module of the same name on the same sys.path entry.
"""

from pipeline.cli import main

raise SystemExit(main())
