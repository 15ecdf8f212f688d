# Heavy, exhaustive checks: `opa test` over the whole policy tree runs them (README step 2;
# `make test` for agov's own copy). A reload skips *_agreement_test.rego files so that a saved
# policy reaches the sidecar quickly: run them before reloading an edited workspace.
package agov.admission_test

import data.agov.admission

# decision answers from allow alone when it holds. Across statuses, each fact
# spoiled in turn and bad or missing request fields, allow must hold exactly
# when reasons is empty, and decision must say what allow, code and reasons say.
every_fact_true := object.union(governed.facts, sandbox.facts)

spoiled_facts[name] := {"facts": patch(every_fact_true, sprintf("/%s", [fact]), bad)} if {
	some fact, _ in every_fact_true
	some bad in [false, "true"]
	name := sprintf("%s is %v", [fact, bad])
}

# Each variant is merged into the request; {} leaves the field out.
fact_variants := object.union(spoiled_facts, {
	"all true": {"facts": every_fact_true},
	"proof_present is 1": {"facts": patch(every_fact_true, "/proof_present", 1)},
	"containment_valid is null": {"facts": patch(every_fact_true, "/containment_valid", null)},
	"facts null": {"facts": null},
	"facts a list": {"facts": [true, true, true, true, true, true, true, true]},
	"facts missing": {},
})

status_variants := {
	"GOVERNED_VALID": {"status": "GOVERNED_VALID"},
	"GOVERNED_RESTRICTED": {"status": "GOVERNED_RESTRICTED"},
	"SANDBOX": {"status": "SANDBOX"},
	"GOVERNED_INVALIDATED": {"status": "GOVERNED_INVALIDATED"},
	"unknown": {"status": "ACTIVE"},
	"null": {"status": null},
	"missing": {},
}

request_variants := {
	"well formed": {"agent_id": "a", "now": "2026-03-01T12:00:00Z"},
	"agent_id missing": {"now": "2026-03-01T12:00:00Z"},
	"now not RFC 3339": {"agent_id": "a", "now": "1740830400"},
}

test_allow_and_decision_agree_with_the_reasons if {
	every name, case in variant_cases {
		got := [admission.allow, admission.decision, admission.code, admission.reasons] with input as case
		[allow, decision, code, reasons] := got
		print_on_failure(name, [allow, decision], [count(reasons) == 0, {"allow": allow, "code": code, "reasons": reasons}])
	}
}

variant_cases[[status_name, facts_name, request_name]] := object.union_n([request, status, facts]) if {
	some status_name, status in status_variants
	some facts_name, facts in fact_variants
	some request_name, request in request_variants
}

variant_cases[["not an object", value]] := value if some value in [null, true, 7, "GOVERNED_VALID", ["GOVERNED_VALID"]]
