# Heavy, exhaustive checks: `make test` runs them; a reload skips *_agreement_test.rego
# files so that a saved policy reaches the sidecar quickly.
package agov.admission_test

import data.agov.admission

# decision answers an admitted start without building the reasons. Across
# statuses, each fact spoiled in turn and bad request fields, it must equal
# what allow, code and reasons say.
every_fact_true := object.union(governed.facts, sandbox.facts)

spoiled_facts[name] := patch(every_fact_true, sprintf("/%s", [fact]), bad) if {
	some fact, _ in every_fact_true
	some bad in [false, "true"]
	name := sprintf("%s is %v", [fact, bad])
}

fact_variants := object.union(spoiled_facts, {"all true": every_fact_true, "facts missing": null})

status_variants := ["GOVERNED_VALID", "GOVERNED_RESTRICTED", "SANDBOX", "GOVERNED_INVALIDATED", "ACTIVE", null]

request_variants := {
	"well formed": {"agent_id": "a", "now": "2026-03-01T12:00:00Z"},
	"agent_id blank": {"agent_id": " ", "now": "2026-03-01T12:00:00Z"},
	"agent_id a number": {"agent_id": 7, "now": "2026-03-01T12:00:00Z"},
	"now not RFC 3339": {"agent_id": "a", "now": "1740830400"},
}

test_the_admitted_shortcut_agrees_with_the_reasons if {
	every status in status_variants {
		every facts_name, facts in fact_variants {
			every request_name, request in request_variants {
				case := object.union(request, {"status": status, "facts": facts})
				got := admission.decision with input as case
				want := {"allow": admission.allow, "code": admission.code, "reasons": admission.reasons} with input as case
				print_on_failure(sprintf("%v, %s, %s", [status, facts_name, request_name]), got, want)
			}
		}
	}
}
