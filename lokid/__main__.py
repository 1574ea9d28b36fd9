from lokid.cli import main

raise SystemExit(main())
