# Heavy, exhaustive checks: `make test` runs them; a reload skips *_agreement_test.rego
# files so that a saved policy reaches the sidecar quickly.
package agov.lib.spec_rules_test

import data.agov.lib.spec_rules

# Any value, in any place, gives a defined answer: an undefined deny_for would
# be an empty deny, that is, an allow.
test_functions_are_defined_for_any_value if {
	every value in odd_values {
		count(spec_rules.deny_for(value, org)) > 0
		count(spec_rules.deny_for(json.patch(agent, [{"op": "add", "path": "/spec", "value": value}]), org)) > 0
		"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT" in {d.code | some d in spec_rules.deny_for(agent, value)}
		is_set(spec_rules.warn_for(value, value))
		is_set(spec_rules.warn_for(agent, value))
	}
}
