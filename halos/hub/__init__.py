"""Publishing a suite's models to the Hugging Face Hub (`halos publish`): model cards with the
eval results (`card`), the exact files of a repo and its name (`plan`), and the safe, idempotent
upload with a reload check (`publish`)."""
