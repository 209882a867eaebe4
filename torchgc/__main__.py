from torchgc.cli import main

raise SystemExit(main())
