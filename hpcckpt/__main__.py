from hpcckpt.cli.main import main

raise SystemExit(main())
