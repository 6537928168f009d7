output "orchestrator_service_account" {
  description = "Account the orchestrator runs as (GKE annotation iam.gke.io/gcp-service-account)."
  value       = google_service_account.orchestrator.email
}

output "runner_service_account" {
  description = "Put this in clouds.gcp.service_account of the orchestrator config."
  value       = google_service_account.runner.email
}

output "custom_role" {
  description = "The custom role granted to the orchestrator account."
  value       = google_project_iam_custom_role.orchestrator.name
}
