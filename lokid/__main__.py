try:
    from lokid.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports lokid: nothing was started yet
    raise SystemExit(130) from None

raise SystemExit(main())
