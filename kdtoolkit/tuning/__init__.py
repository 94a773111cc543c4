"""``kd tune``: an Optuna study over a recipe's ``[tune]`` space, scored on validation splits
only (:mod:`.study`), its trials (:mod:`.objective`), worker processes (:mod:`.workers`) and
outputs (:mod:`.outputs`). Built on the engine; the engine does not import it."""
