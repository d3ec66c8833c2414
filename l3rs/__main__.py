from l3rs.cli import main

raise SystemExit(main())
