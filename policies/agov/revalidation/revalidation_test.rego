package agov.revalidation_test

import data.agov.lib.spec_rules_test
import data.agov.revalidation

# the limits the tests are written against (see agov.lib.spec_rules_test.config)
config := spec_rules_test.config

agent := spec_rules_test.agent

patch(doc, path, value) := json.patch(doc, [{"op": "add", "path": path, "value": value}])

passing := {"id": "a-pass", "agent": agent}

warning := {"id": "a-warn", "agent": patch(agent, "/spec/agent_type", "autonomous")}

failing := {"id": "a-fail", "agent": patch(agent, "/spec/anatomy/reasoning/temperature", 0.9)}

chunk := {
	"agents": [passing, warning, failing],
	"org": {"max_monthly_budget_usd": 1000},
	"policy_hash": "9f2c0e4ab1d37c55e0b8f6a2d4c1e3f5a7b9d0c2e4f6a8b0c1d3e5f7a9b2c4d6",
	"now": "2026-03-01T12:00:00Z",
}

codes(findings) := {f.code | some f in findings}

summary(results) := {id: [r.allow, codes(r.deny), codes(r.warn)] | some id, r in results}

test_mixed_chunk if {
	summary(revalidation.results) == {
		"a-pass": [true, set(), set()],
		"a-warn": [true, set(), {"PROMOTION_WARN_AUTONOMOUS_AGENT"}],
		"a-fail": [false, {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, set()],
	} with input as chunk with data.agov.config as config
}

test_failing_message if {
	revalidation.results["a-fail"].deny == {{
		"code": "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
		"message": "temperature 0.9 exceeds the compliance limit 0.3",
	}} with input as chunk with data.agov.config as config
}

# The results do not depend on the order of the agents in the chunk.
test_order_does_not_matter if {
	forward := revalidation.results with input as chunk with data.agov.config as config
	backward := revalidation.results with input as patch(chunk, "/agents", [failing, warning, passing])
		with data.agov.config as config
	forward == backward
}

test_missing_org_denies_every_agent if {
	results := revalidation.results with input as json.remove(chunk, ["org"]) with data.agov.config as config
	count(results) == 3
	every result in results {
		result.allow == false
		"PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT" in codes(result.deny)
	}
}

test_agent_missing_denies if {
	result := revalidation.results.bare with input as patch(chunk, "/agents", [{"id": "bare"}])
		with data.agov.config as config
	result.allow == false
	"PROMOTION_DENY_INPUT_INVALID" in codes(result.deny)
}

test_entries_without_a_usable_id_have_no_result if {
	results := revalidation.results with input as patch(chunk, "/agents", [
		passing,
		{"agent": agent},
		{"id": "", "agent": agent},
		{"id": 7, "agent": agent},
		"not an entry",
	])
		with data.agov.config as config
	object.keys(results) == {"a-pass"}
}

test_empty_chunk if {
	revalidation.results == {} with input as patch(chunk, "/agents", []) with data.agov.config as config
}

test_a_later_policy_change_invalidates if {
	results := revalidation.results with input as chunk
		with data.agov.config as config
		with data.agov.config.temperature_limits.compliance as 0.1
	summary(results)["a-pass"] == [false, {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, set()]
}

# Every spec_rules table case with the chunk's org gives, in a chunk, the
# same findings as agov.lib.spec_rules gives for it alone (as in promotion).
test_a_repeated_entry_has_one_result if {
	results := revalidation.results with input as patch(chunk, "/agents", [passing, failing, passing])
		with data.agov.config as config
	object.keys(results) == {"a-pass", "a-fail"}
}

# Each verdict is agov.promotion's deny and warn, not only agov.lib.spec_rules's
# (a rule written in promotion.rego, judged per agent, is in the integration
# test test_rules_an_author_writes_in_promotion_rego_judge_the_governed_agents_too).
test_the_verdict_is_the_promotion_decision if {
	denied := {{"code": "PROMOTION_DENY_FORBIDDEN_MODEL", "message": "model m is forbidden"}}
	warned := {{"code": "PROMOTION_WARN_MCP_SERVER", "message": "mcp servers run restricted"}}
	results := revalidation.results with input as chunk with data.agov.config as config
		with data.agov.promotion.deny as denied
		with data.agov.promotion.warn as warned
	count(results) == 3
	every result in results {
		result == {"allow": false, "deny": denied, "warn": warned}
	}
}

# Who may promote is a question for a promotion request; a revalidation has
# none, so a change to promotion_roles invalidates no agent.
test_promotion_roles_do_not_judge_governed_agents if {
	nobody := object.union(config, {"promotion_roles": []})
	summary(revalidation.results) == {
		"a-pass": [true, set(), set()],
		"a-warn": [true, set(), {"PROMOTION_WARN_AUTONOMOUS_AGENT"}],
		"a-fail": [false, {"PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"}, set()],
	} with input as chunk with data.agov.config as nobody
	no_roles := json.remove(config, ["promotion_roles"])
	revalidation.results["a-pass"].allow with input as chunk with data.agov.config as no_roles
}

# The request revalidation makes is a well-formed promotion input: a chunk
# without policy_hash or now (which the engine always sends) denies each agent.
test_a_chunk_missing_request_fields_denies if {
	results := revalidation.results with input as json.remove(chunk, ["now"]) with data.agov.config as config
	results["a-pass"].deny == {{"code": "PROMOTION_DENY_INPUT_INVALID", "message": "now must be an RFC 3339 timestamp"}}
}

# The shipped fast paths skip nothing the full rules find, on any entry.
test_no_trial_failures_for_the_shipped_rules if {
	count(revalidation.trial_failures) == 0 with input as patch(chunk, "/agents", [
		passing,
		warning,
		failing,
		{"id": "bare"},
		{"id": "odd", "agent": {"spec": []}},
		"not an entry",
	])
		with data.agov.config as config
	count(revalidation.trial_failures) == 0 with input as json.remove(chunk, ["org"]) with data.agov.config as config
}

# A check added to _denials alone: the fast path passes the agents it denies.
mock_extra_denial(_, _) := {{"code": "PROMOTION_DENY_EXTRA", "message": "added to _denials alone"}}

test_a_check_in_the_full_denials_alone_is_a_trial_failure if {
	failures := revalidation.trial_failures with input as chunk with data.agov.config as config
		with data.agov.lib.spec_rules._denials as mock_extra_denial
	ids := {id | some message in failures; some id in ["a-pass", "a-warn", "a-fail"]; contains(message, json.marshal(id))}
	ids == {"a-pass", "a-warn"}
	every message in failures {
		contains(message, `["PROMOTION_DENY_EXTRA"] found by the full rules`)
	}
}

# The same for _warnings and the fast path of warn_for.
mock_extra_warning(_, _) := {{"code": "PROMOTION_WARN_EXTRA", "message": "added to _warnings alone"}}

test_a_check_in_the_full_warnings_alone_is_a_trial_failure if {
	failures := revalidation.trial_failures with input as chunk with data.agov.config as config
		with data.agov.lib.spec_rules._warnings as mock_extra_warning
	ids := {id | some message in failures; some id in ["a-pass", "a-warn", "a-fail"]; contains(message, json.marshal(id))}
	ids == {"a-pass", "a-fail"}
}
