package agov.admission_test

import data.agov.admission

governed := {
	"agent_id": "finance-reconciler-prod",
	"status": "GOVERNED_VALID",
	"facts": {
		"proof_present": true,
		"signature_valid": true,
		"signer_not_revoked": true,
		"proof_not_expired": true,
		"spec_hash_match": true,
		"policy_hash_match": true,
	},
	"now": "2026-03-01T12:00:00Z",
}

sandbox := {
	"agent_id": "finance-reconciler-dev",
	"status": "SANDBOX",
	"facts": {"sandbox_not_expired": true, "containment_valid": true},
	"now": "2026-03-01T12:00:00Z",
}

proof_codes := [
	"ADMISSION_DENY_PROOF_MISSING",
	"ADMISSION_DENY_SIGNATURE_INVALID",
	"ADMISSION_DENY_SIGNER_REVOKED",
	"ADMISSION_DENY_PROOF_EXPIRED",
	"ADMISSION_DENY_SPEC_HASH_MISMATCH",
	"ADMISSION_DENY_POLICY_HASH_MISMATCH",
]

all_codes := {
	"ADMISSION_ALLOW",
	"ADMISSION_DENY_PROOF_MISSING",
	"ADMISSION_DENY_SIGNATURE_INVALID",
	"ADMISSION_DENY_SIGNER_REVOKED",
	"ADMISSION_DENY_PROOF_EXPIRED",
	"ADMISSION_DENY_SPEC_HASH_MISMATCH",
	"ADMISSION_DENY_POLICY_HASH_MISMATCH",
	"ADMISSION_DENY_SANDBOX_EXPIRED",
	"ADMISSION_DENY_CONTAINMENT_VIOLATION",
	"ADMISSION_DENY_INVALIDATED",
	"ADMISSION_DENY_INPUT_INVALID",
}

patch(doc, path, value) := json.patch(doc, [{"op": "add", "path": path, "value": value}])

# print_on_failure is got == want, and prints the failing case (opa test -v).
print_on_failure(name, got, want) if {
	got == want
} else := false if {
	print(name, "got", got, "want", want)
}

reason_codes(decision) := [r.code | some r in decision.reasons]

# Each case: the input, the code, and the codes of reasons in order.
cases := {
	"governed valid": {"input": governed, "code": "ADMISSION_ALLOW", "reasons": []},
	"governed restricted": {
		"input": patch(governed, "/status", "GOVERNED_RESTRICTED"),
		"code": "ADMISSION_ALLOW", "reasons": [],
	},
	"sandbox": {"input": sandbox, "code": "ADMISSION_ALLOW", "reasons": []},
	"proof missing": {
		"input": patch(governed, "/facts/proof_present", false),
		"code": "ADMISSION_DENY_PROOF_MISSING", "reasons": ["ADMISSION_DENY_PROOF_MISSING"],
	},
	"signature invalid": {
		"input": patch(governed, "/facts/signature_valid", false),
		"code": "ADMISSION_DENY_SIGNATURE_INVALID", "reasons": ["ADMISSION_DENY_SIGNATURE_INVALID"],
	},
	"signer revoked": {
		"input": patch(governed, "/facts/signer_not_revoked", false),
		"code": "ADMISSION_DENY_SIGNER_REVOKED", "reasons": ["ADMISSION_DENY_SIGNER_REVOKED"],
	},
	"proof expired": {
		"input": patch(governed, "/facts/proof_not_expired", false),
		"code": "ADMISSION_DENY_PROOF_EXPIRED", "reasons": ["ADMISSION_DENY_PROOF_EXPIRED"],
	},
	"spec hash mismatch": {
		"input": patch(governed, "/facts/spec_hash_match", false),
		"code": "ADMISSION_DENY_SPEC_HASH_MISMATCH", "reasons": ["ADMISSION_DENY_SPEC_HASH_MISMATCH"],
	},
	"policy hash mismatch (restricted)": {
		"input": patch(patch(governed, "/status", "GOVERNED_RESTRICTED"), "/facts/policy_hash_match", false),
		"code": "ADMISSION_DENY_POLICY_HASH_MISMATCH", "reasons": ["ADMISSION_DENY_POLICY_HASH_MISMATCH"],
	},
	"every proof fact false: precedence": {
		"input": patch(governed, "/facts", {fact: false | some fact, _ in governed.facts}),
		"code": "ADMISSION_DENY_PROOF_MISSING", "reasons": proof_codes,
	},
	"facts missing": {
		"input": json.remove(governed, ["facts"]),
		"code": "ADMISSION_DENY_PROOF_MISSING", "reasons": ["ADMISSION_DENY_PROOF_MISSING"],
	},
	"facts not an object": {
		"input": patch(governed, "/facts", [true, true, true, true, true, true]),
		"code": "ADMISSION_DENY_PROOF_MISSING", "reasons": ["ADMISSION_DENY_PROOF_MISSING"],
	},
	# What the engine sends for a revoked signer: the facts after it are unknown.
	"facts never established are not listed": {
		"input": patch(governed, "/facts", object.union(
			{fact: null | some fact, _ in governed.facts},
			{"proof_present": true, "signature_valid": true, "signer_not_revoked": false},
		)),
		"code": "ADMISSION_DENY_SIGNER_REVOKED", "reasons": ["ADMISSION_DENY_SIGNER_REVOKED"],
	},
	"a false fact after an unknown one is listed": {
		"input": patch(patch(governed, "/facts/signature_valid", null), "/facts/policy_hash_match", false),
		"code": "ADMISSION_DENY_SIGNATURE_INVALID",
		"reasons": ["ADMISSION_DENY_SIGNATURE_INVALID", "ADMISSION_DENY_POLICY_HASH_MISMATCH"],
	},
	"later facts keep their order": {
		"input": patch(patch(governed, "/facts/policy_hash_match", false), "/facts/signer_not_revoked", false),
		"code": "ADMISSION_DENY_SIGNER_REVOKED",
		"reasons": ["ADMISSION_DENY_SIGNER_REVOKED", "ADMISSION_DENY_POLICY_HASH_MISMATCH"],
	},
	"fact the string true": {
		"input": patch(governed, "/facts/signature_valid", "true"),
		"code": "ADMISSION_DENY_SIGNATURE_INVALID", "reasons": ["ADMISSION_DENY_SIGNATURE_INVALID"],
	},
	"fact the number 1": {
		"input": patch(governed, "/facts/signer_not_revoked", 1),
		"code": "ADMISSION_DENY_SIGNER_REVOKED", "reasons": ["ADMISSION_DENY_SIGNER_REVOKED"],
	},
	"fact null": {
		"input": patch(governed, "/facts/proof_not_expired", null),
		"code": "ADMISSION_DENY_PROOF_EXPIRED", "reasons": ["ADMISSION_DENY_PROOF_EXPIRED"],
	},
	"governed ignores sandbox facts": {
		"input": patch(patch(governed, "/facts/sandbox_not_expired", false), "/facts/containment_valid", false),
		"code": "ADMISSION_ALLOW", "reasons": [],
	},
	"sandbox expired": {
		"input": patch(sandbox, "/facts/sandbox_not_expired", false),
		"code": "ADMISSION_DENY_SANDBOX_EXPIRED", "reasons": ["ADMISSION_DENY_SANDBOX_EXPIRED"],
	},
	"sandbox containment violated": {
		"input": patch(sandbox, "/facts/containment_valid", "yes"),
		"code": "ADMISSION_DENY_CONTAINMENT_VIOLATION", "reasons": ["ADMISSION_DENY_CONTAINMENT_VIOLATION"],
	},
	"sandbox facts missing: the first is listed": {
		"input": json.remove(sandbox, ["facts"]),
		"code": "ADMISSION_DENY_SANDBOX_EXPIRED", "reasons": ["ADMISSION_DENY_SANDBOX_EXPIRED"],
	},
	"sandbox ignores proof facts": {
		"input": patch(sandbox, "/facts/proof_present", false),
		"code": "ADMISSION_ALLOW", "reasons": [],
	},
	"sandbox with proof facts only": {
		"input": patch(sandbox, "/facts", governed.facts),
		"code": "ADMISSION_DENY_SANDBOX_EXPIRED", "reasons": ["ADMISSION_DENY_SANDBOX_EXPIRED"],
	},
	"invalidated with every fact true": {
		"input": patch(governed, "/status", "GOVERNED_INVALIDATED"),
		"code": "ADMISSION_DENY_INVALIDATED", "reasons": ["ADMISSION_DENY_INVALIDATED"],
	},
	"invalidated comes before bad input": {
		"input": json.remove(patch(governed, "/status", "GOVERNED_INVALIDATED"), ["agent_id"]),
		"code": "ADMISSION_DENY_INVALIDATED",
		"reasons": ["ADMISSION_DENY_INVALIDATED", "ADMISSION_DENY_INPUT_INVALID"],
	},
	"status unknown": {
		"input": patch(governed, "/status", "ACTIVE"),
		"code": "ADMISSION_DENY_INPUT_INVALID", "reasons": ["ADMISSION_DENY_INPUT_INVALID"],
	},
	"status lower case": {
		"input": patch(sandbox, "/status", "sandbox"),
		"code": "ADMISSION_DENY_INPUT_INVALID", "reasons": ["ADMISSION_DENY_INPUT_INVALID"],
	},
	"status a list": {
		"input": patch(governed, "/status", ["GOVERNED_VALID"]),
		"code": "ADMISSION_DENY_INPUT_INVALID", "reasons": ["ADMISSION_DENY_INPUT_INVALID"],
	},
	"agent_id blank comes before facts": {
		"input": patch(patch(governed, "/agent_id", " "), "/facts/proof_present", false),
		"code": "ADMISSION_DENY_INPUT_INVALID",
		"reasons": ["ADMISSION_DENY_INPUT_INVALID", "ADMISSION_DENY_PROOF_MISSING"],
	},
	"now not RFC 3339": {
		"input": patch(sandbox, "/now", "1740830400"),
		"code": "ADMISSION_DENY_INPUT_INVALID", "reasons": ["ADMISSION_DENY_INPUT_INVALID"],
	},
	"input not an object": {
		"input": ["GOVERNED_VALID"],
		"code": "ADMISSION_DENY_INPUT_INVALID",
		"reasons": ["ADMISSION_DENY_INPUT_INVALID", "ADMISSION_DENY_INPUT_INVALID", "ADMISSION_DENY_INPUT_INVALID"],
	},
}

test_cases if {
	every name, case in cases {
		decision := admission.decision with input as case.input
		print_on_failure(name, [decision.code, reason_codes(decision)], [case.code, case.reasons])
		print_on_failure(name, decision.allow, case.code == "ADMISSION_ALLOW")
	}
}

test_every_code_is_covered if {
{case.code | some case in cases} | {code | some case in cases; some code in case.reasons} == all_codes}

test_no_input_denies if {
	admission.decision.allow == false
	admission.decision.code == "ADMISSION_DENY_INPUT_INVALID"
}

test_reason_messages if {
	facts_input := patch(
		json.remove(patch(governed, "/facts/signature_valid", "true"), ["facts/proof_not_expired"]),
		"/facts/policy_hash_match", false,
	)
	admission.decision.reasons == [
		{
			"code": "ADMISSION_DENY_SIGNATURE_INVALID",
			"message": `the proof signature is invalid (facts.signature_valid is "true", want true)`,
		},
		{
			"code": "ADMISSION_DENY_POLICY_HASH_MISMATCH",
			"message": "the policy hash differs from the one the proof signs (facts.policy_hash_match is false, want true)",
		},
	] with input as facts_input
}

test_reason_message_of_a_missing_fact if {
	admission.decision.reasons == [{
		"code": "ADMISSION_DENY_PROOF_MISSING",
		"message": "no promotion proof is present (facts.proof_present is missing, want true)",
	}] with input as json.remove(governed, ["facts"])
}

test_status_message if {
	admission.decision.reasons == [{
		"code": "ADMISSION_DENY_INPUT_INVALID",
		"message": concat("", [
			`status "ACTIVE" is not one of `,
			`["GOVERNED_RESTRICTED", "GOVERNED_VALID", "SANDBOX", "GOVERNED_INVALIDATED"]`,
		]),
	}] with input as patch(governed, "/status", "ACTIVE")
}

# R14: each required input field dropped in turn must deny, with this code.
required_fields := {
	"governed": {
		"input": governed,
		"fields": {
			"agent_id": "ADMISSION_DENY_INPUT_INVALID",
			"status": "ADMISSION_DENY_INPUT_INVALID",
			"facts": "ADMISSION_DENY_PROOF_MISSING",
			"facts/proof_present": "ADMISSION_DENY_PROOF_MISSING",
			"facts/signature_valid": "ADMISSION_DENY_SIGNATURE_INVALID",
			"facts/signer_not_revoked": "ADMISSION_DENY_SIGNER_REVOKED",
			"facts/proof_not_expired": "ADMISSION_DENY_PROOF_EXPIRED",
			"facts/spec_hash_match": "ADMISSION_DENY_SPEC_HASH_MISMATCH",
			"facts/policy_hash_match": "ADMISSION_DENY_POLICY_HASH_MISMATCH",
			"now": "ADMISSION_DENY_INPUT_INVALID",
		},
	},
	"sandbox": {
		"input": sandbox,
		"fields": {
			"agent_id": "ADMISSION_DENY_INPUT_INVALID",
			"status": "ADMISSION_DENY_INPUT_INVALID",
			"facts": "ADMISSION_DENY_SANDBOX_EXPIRED",
			"facts/sandbox_not_expired": "ADMISSION_DENY_SANDBOX_EXPIRED",
			"facts/containment_valid": "ADMISSION_DENY_CONTAINMENT_VIOLATION",
			"now": "ADMISSION_DENY_INPUT_INVALID",
		},
	},
}

test_r14_each_required_field_dropped_denies if {
	every name, table in required_fields {
		admission.decision.allow with input as table.input
		every path, code in table.fields {
			decision := admission.decision with input as json.remove(table.input, [path])
			print_on_failure(sprintf("%s without %s", [name, path]), [decision.allow, decision.code], [false, code])
		}
	}
}

# decision answers from allow alone when it holds, so allow must hold exactly
# when there is no reason to deny. This file runs at every reload.
test_allow_holds_exactly_when_there_are_no_reasons if {
	dropped := [json.remove(table.input, [path]) |
		some table in required_fields
		some path, _ in table.fields
	]
	inputs := array.concat([case.input | some case in cases], dropped)
	every i, case in inputs {
		got := [admission.allow, admission.decision, admission.code, admission.reasons] with input as case
		[allow, decision, code, reasons] := got
		print_on_failure(i, [allow, decision], [count(reasons) == 0, {"allow": allow, "code": code, "reasons": reasons}])
	}
}
