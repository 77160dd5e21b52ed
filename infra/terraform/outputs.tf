output "role_arn" {
  description = "Put this in k8s/overlays/prod/serviceaccount-irsa.yaml's eks.amazonaws.com/role-arn annotation"
  value       = aws_iam_role.job.arn
}

output "merged_bucket" {
  description = "The merged bucket: the fleet config's output is s3://<this>/<prefix>/"
  value       = aws_s3_bucket.merged.bucket
}

output "gc_policy_arn" {
  description = "Attach to the role that runs `safemerge-ray gc` (never to the nightly job's role)"
  value       = aws_iam_policy.gc.arn
}
