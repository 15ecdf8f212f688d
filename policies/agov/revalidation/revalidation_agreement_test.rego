# Heavy, exhaustive checks: `opa test` over the whole policy tree runs them (README step 2;
# `make test` for agov's own copy). A reload skips *_agreement_test.rego files so that a saved
# policy reaches the sidecar quickly: run them before reloading an edited workspace.
package agov.revalidation_test

import data.agov.lib.spec_rules
import data.agov.lib.spec_rules_test
import data.agov.revalidation

test_results_match_spec_rules if {
	table := {name: case.input.agent |
		some name, case in spec_rules_test.cases
		case.input.org == chunk.org
	}
	agents := [{"id": name, "agent": a} | some name, a in table]
	results := revalidation.results with input as patch(chunk, "/agents", agents)
	count(results) == count(table)
	every name, a in table {
		want_deny := spec_rules.deny with input as {"agent": a, "org": chunk.org}
		want_warn := spec_rules.warn with input as {"agent": a, "org": chunk.org}
		results[name] == {"allow": count(want_deny) == 0, "deny": want_deny, "warn": want_warn}
	}
}
