import sys

if sys.argv[1:2] == ["quality"]:  # python -m bench quality ...: the DreamBench-style quality benchmark
    from .quality.run import main as quality_main

    raise SystemExit(quality_main(sys.argv[2:]))

from .run import main  # noqa: E402

raise SystemExit(main())
