"""masklab.tools: this repository's own tools, in a source checkout only (the wheel leaves them out).

:mod:`~masklab.tools.bench` runs ``benchmarks/`` into one report,
:mod:`~masklab.tools.study` trains every method against its baseline, and
:mod:`~masklab.tools.readme` rewrites the README's generated sections.
``masklab bench``, ``masklab study`` and the ``--readme`` options call them.
"""

__all__: list[str] = []
