from pipeline.app.cli import main

main(prog_name="python -m pipeline")
