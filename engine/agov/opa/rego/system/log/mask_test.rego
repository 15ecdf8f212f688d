package system.log_test

import data.system.log

test_revalidation_specs_are_erased if {
	log.mask == {"/input/agents"} with input as {"path": "agov/revalidation/results", "input": {"agents": []}}
}

test_other_decisions_keep_their_input if {
	every path in ["agov/admission/decision", "agov/promotion/decision", "agov/revalidation"] {
		count(log.mask) == 0 with input as {"path": path, "input": {"agents": []}}
	}
}
