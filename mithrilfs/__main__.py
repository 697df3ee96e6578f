from mithrilfs.cli import main

raise SystemExit(main())
