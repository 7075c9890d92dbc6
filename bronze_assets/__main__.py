from bronze_assets.cli import main

raise SystemExit(main())
