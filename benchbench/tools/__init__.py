"""Research tools beside the benchmark, outside the import graph of a run: the headroom probe
(:mod:`.headroom`) and the corpus-layout fixture writers (:mod:`.fixtures`). They may import methods
and tasks directly; nothing a run imports may import them (``tests/test_architecture.py``)."""
