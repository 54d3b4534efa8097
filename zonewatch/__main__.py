from zonewatch.cli import main

raise SystemExit(main())
