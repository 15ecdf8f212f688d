# Heavy, exhaustive checks: `opa test` over the whole policy tree runs them (README step 2;
# `make test` for agov's own copy). A reload skips *_agreement_test.rego files so that a saved
# policy reaches the sidecar quickly: run them before reloading an edited workspace.
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

# Every field of the valid agent, set in turn to each odd value or removed.
odd_values := [null, true, false, 0, -1, 1.5, "", " ", "x", [], [1], {}, {"spec": "x"}, {"spec": {"anatomy": []}}]

paths := {
	"/apiVersion", "/kind", "/metadata", "/metadata/id", "/metadata/name", "/metadata/version", "/spec",
	"/spec/agent_type", "/spec/role_class", "/spec/anatomy", "/spec/anatomy/reasoning",
	"/spec/anatomy/reasoning/model", "/spec/anatomy/reasoning/temperature", "/spec/anatomy/inputs",
	"/spec/anatomy/actions", "/spec/anatomy/memory", "/spec/anatomy/memory/kind", "/spec/capabilities",
	"/spec/containment", "/spec/containment/external_calls", "/spec/containment/persistent_writes",
	"/spec/economics", "/spec/economics/monthly_budget_usd",
}

mutations := {{"agent": json.patch(agent, [{"op": "add", "path": path, "value": value}]), "org": org} |
	some path in paths
	some value in odd_values
} | {{"agent": json.remove(agent, [path]), "org": org} | some path in paths}

# The inputs of every table above, and the mutations, for the tests below.
all_inputs := ({case.input | some case in cases} | {case.input | some case in messages}) | mutations

configs := {
	"default": data.agov.config,
	"empty": {},
	"no warn ratio": object.remove(data.agov.config, ["budget_warn_ratio"]),
	"no limits": object.remove(data.agov.config, ["temperature_limits"]),
}

# The fast paths of deny_for and warn_for must never be looser than the full
# rules: on every input, with every configuration, both give the same answer.
# One test per configuration, so that each stays well inside opa test's
# default 5 s timeout on a busy machine.
test_fast_paths_agree_with_the_full_rules_by_default if {
	fast_paths_agree with data.agov.config as configs["default"]
}

test_fast_paths_agree_with_the_full_rules_with_an_empty_config if {
	fast_paths_agree with data.agov.config as configs.empty
}

test_fast_paths_agree_with_the_full_rules_without_a_warn_ratio if {
	fast_paths_agree with data.agov.config as configs["no warn ratio"]
}

test_fast_paths_agree_with_the_full_rules_without_temperature_limits if {
	fast_paths_agree with data.agov.config as configs["no limits"]
}

fast_paths_agree if {
	every doc in all_inputs {
		agent := object.get(doc, "agent", null)
		org := object.get(doc, "org", null)
		fast := [spec_rules.deny_for(agent, org), spec_rules.warn_for(agent, org)]
		full := [spec_rules._denials(agent, org), spec_rules._warnings(agent, org)]
		print_on_failure(doc, "fast path", fast, full)
	}
}

# The functions are the rules over input: promotion and revalidation agree.
test_functions_match_the_rules_over_input if {
	every doc in all_inputs {
		agent := object.get(doc, "agent", null)
		org := object.get(doc, "org", null)
		got := [spec_rules.deny_for(agent, org), spec_rules.warn_for(agent, org)]
		want := [spec_rules.deny, spec_rules.warn] with input as doc
		print_on_failure("input", "functions", got, want)
	}
}
