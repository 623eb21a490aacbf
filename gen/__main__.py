from gen.cli import main

if __name__ == "__main__":  # not when gen serve --workers spawns a worker (it imports __main__)
    main()
