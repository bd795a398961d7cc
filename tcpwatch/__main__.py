from tcpwatch.cli import main

raise SystemExit(main())
