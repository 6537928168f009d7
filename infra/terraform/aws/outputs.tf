output "orchestrator_role_arn" {
  description = "Role the orchestrator runs as (IRSA annotation eks.amazonaws.com/role-arn, or AssumeRole)."
  value       = aws_iam_role.orchestrator.arn
}

output "orchestrator_policy_arn" {
  description = "The least-privilege policy, to attach elsewhere if the role is managed outside this module."
  value       = aws_iam_policy.orchestrator.arn
}

output "runner_instance_profile_name" {
  description = "Put this in clouds.aws.iam_instance_profile of the orchestrator config."
  value       = aws_iam_instance_profile.runner.name
}
